import { useId, useState } from 'react';
import { Field } from '../../components/ui';
import type { Config, ConfigErrors } from './provisionReducer';

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
}: {
  config: Config;
  onChange: (c: Config) => void;
  errors: ConfigErrors;
  showAll: boolean;
  isNew: boolean;
  nameEditable: boolean;
  keepOnFailure: boolean;
  onKeepOnFailure: (keep: boolean) => void;
}) {
  const [dirty, setDirty] = useState<Partial<Record<keyof Config, boolean>>>({});
  const set = (k: keyof Config) => (e: { target: { value: string } }) => {
    setDirty((d) => ({ ...d, [k]: true }));
    onChange({ ...config, [k]: e.target.value });
  };
  const keepId = useId();
  const err = (k: keyof Config) => (showAll || dirty[k] ? errors[k] : null);
  return (
    <div data-testid="configure-step">
      <div className="grid2">
        <Field label="VM name" error={err('name')} hint="Letters, digits and hyphens; a DNS name (max 63)">
          {(p) => <input {...p} value={config.name} onChange={set('name')} disabled={!nameEditable} data-autofocus data-testid="cfg-name" autoComplete="off" />}
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
