import { useEffect, useId, useRef, useState } from 'react';
import { Field } from '../../components/ui';
import type { Config, ConfigErrors } from './provisionReducer';
import type { CloneConfig } from './cloneOptions';

/** Step 3: VM name, application, memory and cores. A field shows its error once edited, or all after Next. */
export function StepConfigure({
  config,
  onChange,
  errors,
  showAll,
  isNew,
  nameEditable,
  keepOnFailure,
  onKeepOnFailure,
  clone,
  onClone,
  focusField,
  nameTaken,
  forceName,
  onForceName,
  bulk,
}: {
  config: Config;
  onChange: (c: Config) => void;
  errors: ConfigErrors;
  showAll: boolean;
  isNew: boolean;
  nameEditable: boolean;
  keepOnFailure: boolean;
  onKeepOnFailure: (keep: boolean) => void;
  clone: CloneConfig;
  onClone: (c: CloneConfig) => void;
  /** A field a failed provision named: focused when the step opens. */
  focusField?: string | null;
  /** Another node has this name (the wizard warns, the admin may continue anyway). */
  nameTaken?: boolean;
  forceName?: boolean;
  onForceName?: (force: boolean) => void;
  /** More than one node: an explicit VMID and static address are the first node's. */
  bulk?: boolean;
}) {
  const [dirty, setDirty] = useState<Partial<Record<keyof Config, boolean>>>({});
  const set = (k: keyof Config) => (e: { target: { value: string } }) => {
    setDirty((d) => ({ ...d, [k]: true }));
    onChange({ ...config, [k]: e.target.value });
  };
  const keepId = useId();
  const forceId = useId();
  const onbootId = useId();
  const root = useRef<HTMLDivElement>(null);
  const err = (k: keyof Config | keyof CloneConfig) => (showAll || dirty[k as keyof Config] ? errors[k] : null);
  const setC =
    <K extends keyof CloneConfig>(k: K) =>
    (e: { target: { value: string } }) => {
      setDirty((d) => ({ ...d, [k]: true }));
      onClone({ ...clone, [k]: e.target.value as CloneConfig[K] });
    };
  // Open on the setting a failed provision named (after the modal's own initial focus).
  useEffect(() => {
    if (!focusField) return;
    const t = setTimeout(() => root.current?.querySelector<HTMLElement>(`[data-field="${focusField}"]`)?.focus(), 0);
    return () => clearTimeout(t);
  }, [focusField]);
  return (
    <div data-testid="configure-step" ref={root}>
      <div className="grid2">
        <Field label="VM name" error={err('name')} hint="Letters, digits and hyphens; a DNS name (max 63)">
          {(p) => <input {...p} value={config.name} onChange={set('name')} disabled={!nameEditable} data-autofocus data-field="name" data-testid="cfg-name" autoComplete="off" />}
        </Field>
        {isNew && (
          <Field label="Application (optional)" hint="Groups nodes, e.g. billing">
            {(p) => <input {...p} value={config.application} onChange={set('application')} data-testid="cfg-application" />}
          </Field>
        )}
        <Field label="Memory (MiB)" error={err('memory')} hint="16 – 4194304 MiB">
          {(p) => <input {...p} inputMode="numeric" value={config.memory} onChange={set('memory')} data-testid="cfg-memory" />}
        </Field>
        <Field label="Cores" error={err('cores')} hint="1 – 512">
          {(p) => <input {...p} inputMode="numeric" value={config.cores} onChange={set('cores')} data-testid="cfg-cores" />}
        </Field>
      </div>
      {nameTaken && nameEditable && (
        <div className="check-field" role="status" data-testid="cfg-name-taken">
          <input type="checkbox" id={forceId} checked={!!forceName} onChange={(e) => onForceName?.(e.target.checked)} aria-describedby={`${forceId}-hint`} data-testid="cfg-force-name" />
          <div>
            <label htmlFor={forceId}>Use this name anyway</label>
            <div className="field-hint" id={`${forceId}-hint`}>
              A node named “{config.name.trim()}” already exists. Two nodes with one name are hard to tell apart.
            </div>
          </div>
        </div>
      )}
      <fieldset className="fieldset" data-testid="clone-options">
        <legend>Proxmox options (optional)</legend>
        <div className="grid2">
          <Field label="Target storage" error={err('storage')} hint="e.g. local-lvm; implies a full clone">
            {(p) => <input {...p} value={clone.storage} onChange={setC('storage')} data-field="storage" data-testid="cfg-storage" autoComplete="off" />}
          </Field>
          <Field label="Clone type" error={err('cloneMode')} hint="Linked clones share the template’s disks">
            {(p) => (
              <select {...p} value={clone.cloneMode} onChange={setC('cloneMode')} data-field="cloneMode" data-testid="cfg-clone-mode">
                <option value="">Default (linked; full with a storage)</option>
                <option value="full">Full clone</option>
                <option value="linked">Linked clone</option>
              </select>
            )}
          </Field>
          <Field label="Disk size (GiB)" error={err('diskSizeGib')} hint="Grows the boot disk; never shrinks">
            {(p) => <input {...p} inputMode="numeric" value={clone.diskSizeGib} onChange={setC('diskSizeGib')} data-field="diskSizeGib" data-testid="cfg-disk" />}
          </Field>
          <Field label="VMID" error={err('vmId')} hint={bulk ? 'The first node’s; each next node gets the next VMID. Empty: the next free ones' : 'Empty: the next free one'}>
            {(p) => <input {...p} inputMode="numeric" value={clone.vmId} onChange={setC('vmId')} data-field="vmId" data-testid="cfg-vmid" />}
          </Field>
          <Field label="Cloud-init user" error={err('ciUser')} hint="Also the user of “Copy SSH command”">
            {(p) => <input {...p} value={clone.ciUser} onChange={setC('ciUser')} data-field="ciUser" data-testid="cfg-ciuser" autoComplete="off" />}
          </Field>
          <Field label="VLAN tag" error={err('vlanTag')} hint="1 – 4094">
            {(p) => <input {...p} inputMode="numeric" value={clone.vlanTag} onChange={setC('vlanTag')} data-field="vlanTag" data-testid="cfg-vlan" />}
          </Field>
          <Field label="IP configuration" error={null} hint="Cloud-init, first interface">
            {(p) => (
              <select {...p} value={clone.ipMode} onChange={setC('ipMode')} data-field="ipMode" data-testid="cfg-ipmode">
                <option value="">Template’s setting</option>
                <option value="dhcp">DHCP</option>
                <option value="static">Static</option>
              </select>
            )}
          </Field>
          {clone.ipMode === 'static' ? (
            <>
              <Field label="IPv4 address / prefix" error={err('ipAddress')} hint={bulk ? 'The first node’s, e.g. 10.0.0.5/24; each next node gets the next address' : 'e.g. 10.0.0.5/24'}>
                {(p) => <input {...p} value={clone.ipAddress} onChange={setC('ipAddress')} data-field="ipAddress" data-testid="cfg-ip" autoComplete="off" />}
              </Field>
              <Field label="Gateway" error={err('gateway')} hint="e.g. 10.0.0.1">
                {(p) => <input {...p} value={clone.gateway} onChange={setC('gateway')} data-field="gateway" data-testid="cfg-gw" autoComplete="off" />}
              </Field>
            </>
          ) : (
            <span />
          )}
          <Field label="Resource pool" error={err('pool')}>
            {(p) => <input {...p} value={clone.pool} onChange={setC('pool')} data-field="pool" data-testid="cfg-pool" autoComplete="off" />}
          </Field>
          <Field label="Proxmox tags" error={err('tags')} hint="Comma-separated; Trellis adds its own">
            {(p) => <input {...p} value={clone.tags} onChange={setC('tags')} data-field="tags" data-testid="cfg-tags" autoComplete="off" />}
          </Field>
        </div>
        <Field label="SSH public keys" error={err('sshKeys')} hint="One per line, e.g. ssh-ed25519 AAAA… me@host">
          {(p) => <textarea {...p} rows={3} value={clone.sshKeys} onChange={setC('sshKeys')} data-field="sshKeys" data-testid="cfg-sshkeys" spellCheck={false} />}
        </Field>
        <div className="check-field">
          <input type="checkbox" id={onbootId} checked={clone.onboot} onChange={(e) => onClone({ ...clone, onboot: e.target.checked })} data-field="onboot" data-testid="cfg-onboot" />
          <div>
            <label htmlFor={onbootId}>Start at boot of the Proxmox node</label>
          </div>
        </div>
      </fieldset>
      <div className="check-field">
        <input
          type="checkbox"
          id={keepId}
          checked={keepOnFailure}
          onChange={(e) => onKeepOnFailure(e.target.checked)}
          aria-describedby={`${keepId}-hint`}
          data-testid="cfg-keep-on-failure"
        />
        <div>
          <label htmlFor={keepId}>Keep the VM for inspection if provisioning fails</label>
          <div className="field-hint" id={`${keepId}-hint`}>
            Otherwise a VM that fails half-way is deleted. A kept VM stays on the hypervisor until you destroy the node.
          </div>
        </div>
      </div>
    </div>
  );
}
