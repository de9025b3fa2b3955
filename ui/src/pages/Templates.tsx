import { useState, type FormEvent } from 'react';
import { errorMessage } from '../lib/api';
import { useAgents, useMutations, useTemplates } from '../lib/queries';
import type { Template, TemplateInput } from '../lib/types';
import { formatMemory } from '../lib/time';
import {
  validateBridge,
  validateCores,
  validateMemory,
  validateProxmoxTemplateId,
  validateRequired,
} from '../lib/validation';
import { ConfirmDialog, Modal } from '../components/Modal';
import { Empty, ErrorBox, Field, Spinner } from '../components/ui';
import { ProxmoxPicker } from '../components/ProxmoxPicker';

const lines = (s: string) =>
  s
    .split('\n')
    .map((l) => l.trim())
    .filter(Boolean);

interface FormState {
  name: string;
  description: string;
  memory: string;
  cores: string;
  proxmoxTemplateId: string;
  proxmoxNode: string;
  networkBridge: string;
  pre: string;
  post: string;
  /** Default cloud-init user of its nodes (`cloneDefaults.ciUser`). */
  ciUser: string;
}

function toForm(t: Template | null): FormState {
  return {
    name: t?.name ?? '',
    description: t?.description ?? '',
    memory: String(t?.memory ?? 2048),
    cores: String(t?.cores ?? 2),
    proxmoxTemplateId: t?.proxmoxTemplateId != null ? String(t.proxmoxTemplateId) : '',
    proxmoxNode: t?.proxmoxNode ?? '',
    networkBridge: t?.networkBridge ?? '',
    pre: (t?.preProvisionCommands ?? []).join('\n'),
    post: (t?.postProvisionCommands ?? []).join('\n'),
    ciUser: t?.cloneDefaults?.ciUser ?? '',
  };
}

export function validateTemplateForm(f: FormState): Partial<Record<keyof FormState, string | null>> {
  return {
    name: validateRequired(f.name, 'Name'),
    memory: validateMemory(f.memory),
    cores: validateCores(f.cores),
    proxmoxTemplateId: validateProxmoxTemplateId(f.proxmoxTemplateId),
    networkBridge: validateBridge(f.networkBridge),
    ciUser: f.ciUser.trim() && !/^[a-z_][a-z0-9_-]{0,31}$/.test(f.ciUser.trim()) ? 'A Linux user name: lower-case letters, digits, _ and - (max 32).' : null,
  };
}

function TemplateDialog({ template, onClose }: { template: Template | null; onClose: () => void }) {
  const m = useMutations();
  const [f, setF] = useState<FormState>(() => toForm(template));
  const [touched, setTouched] = useState(false);
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const [picker, setPicker] = useState(false);
  const agents = useAgents();
  const errs = validateTemplateForm(f);
  const show = (k: keyof FormState) => (touched ? errs[k] : null);
  const set = (k: keyof FormState) => (e: { target: { value: string } }) => setF({ ...f, [k]: e.target.value });

  const submit = async (e: FormEvent) => {
    e.preventDefault();
    setTouched(true);
    if (Object.values(errs).some(Boolean)) return;
    const body: TemplateInput = {
      name: f.name.trim(),
      description: f.description.trim() || null,
      memory: Number(f.memory),
      cores: Number(f.cores),
      proxmoxTemplateId: f.proxmoxTemplateId.trim() ? Number(f.proxmoxTemplateId) : null,
      proxmoxNode: f.proxmoxNode.trim() || null,
      networkBridge: f.networkBridge.trim() || null,
      preProvisionCommands: lines(f.pre),
      postProvisionCommands: lines(f.post),
      // Keep the other clone defaults (set through the API) and set the cloud-init user.
      cloneDefaults: (() => {
        const d = { ...(template?.cloneDefaults ?? {}), ciUser: f.ciUser.trim() || null };
        return Object.values(d).some((v) => v != null && !(Array.isArray(v) && v.length === 0)) ? d : null;
      })(),
    };
    setBusy(true);
    setError(null);
    try {
      if (template) await m.updateTemplate(template.id, body);
      else await m.createTemplate(body);
      onClose();
    } catch (err) {
      setError(errorMessage(err));
    } finally {
      setBusy(false);
    }
  };

  return (
    <Modal
      title={template ? `Edit template ${template.name}` : 'New template'}
      onClose={onClose}
      wide
      testId="template-dialog"
      footer={
        <>
          <button type="button" className="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" form="template-form" className="btn btn-primary" disabled={busy} data-testid="template-save">
            {busy ? 'Saving…' : 'Save template'}
          </button>
        </>
      }
    >
      <form id="template-form" onSubmit={submit} noValidate>
        <div className="grid2">
          <Field label="Name" error={show('name')}>
            {(p) => <input {...p} value={f.name} onChange={set('name')} data-autofocus data-testid="template-name" />}
          </Field>
          <Field label="Description">
            {(p) => <input {...p} value={f.description} onChange={set('description')} />}
          </Field>
          <Field label="Memory (MiB)" error={show('memory')} hint="16 – 4194304">
            {(p) => <input {...p} inputMode="numeric" value={f.memory} onChange={set('memory')} data-testid="template-memory" />}
          </Field>
          <Field label="Cores" error={show('cores')} hint="1 – 512">
            {(p) => <input {...p} inputMode="numeric" value={f.cores} onChange={set('cores')} data-testid="template-cores" />}
          </Field>
        </div>
        <fieldset className="fieldset">
          <legend>Proxmox template</legend>
          <div className="grid3">
            <Field label="Proxmox template VMID" error={show('proxmoxTemplateId')} hint="Required to provision">
              {(p) => (
                <input {...p} inputMode="numeric" value={f.proxmoxTemplateId} onChange={set('proxmoxTemplateId')} placeholder="e.g. 9000" data-testid="template-vmid" />
              )}
            </Field>
            <Field label="Proxmox node" hint="Optional; where the template lives">
              {(p) => <input {...p} value={f.proxmoxNode} onChange={set('proxmoxNode')} placeholder="e.g. pve1" />}
            </Field>
            <Field label="Network bridge" error={show('networkBridge')} hint="Optional, e.g. vmbr0">
              {(p) => <input {...p} value={f.networkBridge} onChange={set('networkBridge')} />}
            </Field>
            <Field label="Cloud-init user" error={show('ciUser')} hint="Optional, e.g. debian; the SSH user of its nodes">
              {(p) => <input {...p} value={f.ciUser} onChange={set('ciUser')} autoComplete="off" data-testid="tpl-ciuser" />}
            </Field>
          </div>
          <button type="button" className="btn btn-sm" aria-expanded={picker} onClick={() => setPicker(!picker)} data-testid="open-picker">
            {picker ? 'Hide hypervisor templates' : 'Pick from a hypervisor’s Proxmox templates…'}
          </button>
          {picker && (
            <div className="picker-box">
              {agents.isPending ? (
                <Spinner />
              ) : agents.error ? (
                <ErrorBox>{errorMessage(agents.error)}</ErrorBox>
              ) : (
                <ProxmoxPicker
                  agents={agents.data ?? []}
                  selectedVmid={f.proxmoxTemplateId ? Number(f.proxmoxTemplateId) : null}
                  onPick={(t) =>
                    setF((cur) => ({
                      ...cur,
                      proxmoxTemplateId: String(t.vmid),
                      proxmoxNode: t.node,
                      name: cur.name || t.name,
                      memory: template ? cur.memory : String(t.memory || cur.memory),
                      cores: template ? cur.cores : String(t.cores || cur.cores),
                    }))
                  }
                />
              )}
            </div>
          )}
        </fieldset>
        <div className="grid2">
          <Field label="Pre-provision commands" hint="One per line">
            {(p) => <textarea {...p} rows={3} value={f.pre} onChange={set('pre')} className="mono" />}
          </Field>
          <Field label="Post-provision commands" hint="One per line, run in the guest after boot">
            {(p) => <textarea {...p} rows={3} value={f.post} onChange={set('post')} className="mono" />}
          </Field>
        </div>
        {error && <ErrorBox title="Could not save">{error}</ErrorBox>}
      </form>
    </Modal>
  );
}

export function Templates() {
  const list = useTemplates();
  const m = useMutations();
  const [editing, setEditing] = useState<Template | null | 'new'>(null);
  const [deleting, setDeleting] = useState<Template | null>(null);
  const [busy, setBusy] = useState(false);
  const [delErr, setDelErr] = useState<string | null>(null);
  const items = list.data ?? [];

  return (
    <div className="page">
      <header className="page-head">
        <div>
          <h1>Templates</h1>
          <p className="muted">Trellis templates map to Proxmox VM templates and carry the defaults for new nodes.</p>
        </div>
        <button type="button" className="btn btn-primary" onClick={() => setEditing('new')} data-testid="new-template">
          New template
        </button>
      </header>
      {list.error && <ErrorBox title="Could not load templates">{errorMessage(list.error)}</ErrorBox>}
      {list.isPending ? (
        <Spinner />
      ) : items.length === 0 ? (
        <Empty>No templates yet. Create one and map it to a Proxmox template VMID.</Empty>
      ) : (
        <div className="table-wrap">
          <table className="table table-stack" data-testid="templates-table">
            <thead>
              <tr>
                <th>Name</th>
                <th>Proxmox VMID</th>
                <th className="hide-sm">Node</th>
                <th>Memory</th>
                <th>Cores</th>
                <th className="hide-md">Bridge</th>
                <th className="hide-md">Post-provision</th>
                <th className="actions-col">Actions</th>
              </tr>
            </thead>
            <tbody>
              {items.map((t) => (
                <tr key={t.id} data-template-name={t.name}>
                  <td data-label="Name" className="cell-title">
                    <strong>{t.name}</strong>
                    {t.system && <span className="tag tag-muted">system</span>}
                    {t.description && <div className="muted small">{t.description}</div>}
                  </td>
                  <td data-label="Proxmox VMID">{t.proxmoxTemplateId ?? <span className="tag tag-warn" title="Cannot be provisioned until mapped">not mapped</span>}</td>
                  <td data-label="Node" className="hide-sm">{t.proxmoxNode ?? '–'}</td>
                  <td data-label="Memory" className="nowrap">{formatMemory(t.memory)}</td>
                  <td data-label="Cores">{t.cores}</td>
                  <td data-label="Bridge" className="hide-md">{t.networkBridge ?? '–'}</td>
                  <td data-label="Post-provision" className="hide-md small">
                    {t.postProvisionCommands.length ? `${t.postProvisionCommands.length} command${t.postProvisionCommands.length > 1 ? 's' : ''}` : '–'}
                  </td>
                  <td className="actions-col">
                    <div className="row-actions">
                      <button type="button" className="btn btn-sm" onClick={() => setEditing(t)}>
                        Edit
                      </button>
                      <button
                        type="button"
                        className="btn btn-sm btn-danger-ghost"
                        disabled={t.system}
                        title={t.system ? 'System templates cannot be deleted' : undefined}
                        onClick={() => {
                          setDelErr(null);
                          setDeleting(t);
                        }}
                      >
                        Delete
                      </button>
                    </div>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
      {editing && <TemplateDialog template={editing === 'new' ? null : editing} onClose={() => setEditing(null)} />}
      {deleting && (
        <ConfirmDialog
          title={`Delete template ${deleting.name}?`}
          confirmLabel="Delete template"
          danger
          busy={busy}
          error={delErr}
          onCancel={() => setDeleting(null)}
          onConfirm={async () => {
            setBusy(true);
            try {
              await m.deleteTemplate(deleting.id);
              setDeleting(null);
            } catch (e) {
              setDelErr(errorMessage(e));
            } finally {
              setBusy(false);
            }
          }}
        >
          <p>Existing nodes keep their settings; the Proxmox template itself is not touched.</p>
        </ConfirmDialog>
      )}
    </div>
  );
}
