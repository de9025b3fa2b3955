import type { Agent } from '../../lib/types';
import { ErrorBox, Field, Notice, RelTime, Spinner, StatusPill } from '../../components/ui';
import { proxmoxNodes } from '../Hypervisors';
import { hypervisorUnavailable } from './provisionReducer';

/** Step 1: the hypervisor that creates the VM, and optionally the Proxmox node. */
export function StepHypervisor({
  agents,
  loading,
  error,
  value,
  onChange,
  targetNode,
  onTargetNode,
}: {
  agents: Agent[];
  loading: boolean;
  error: string | null;
  value: string;
  onChange: (id: string) => void;
  targetNode: string;
  onTargetNode: (n: string) => void;
}) {
  if (loading && agents.length === 0) return <Spinner />;
  const selected = agents.find((a) => a.id === value);
  const nodes = selected ? proxmoxNodes(selected.facts) : [];
  return (
    <div>
      {error && <ErrorBox>{error}</ErrorBox>}
      {agents.length === 0 ? (
        <Notice>No hypervisors are registered. Register one on the Hypervisors page first.</Notice>
      ) : (
        <fieldset className="choice-list" data-testid="hypervisor-choices">
          <legend>Choose the hypervisor that will create the VM</legend>
          {agents.map((a) => {
            const why = hypervisorUnavailable(a);
            return (
              <label key={a.id} className={`choice ${why ? 'choice-disabled' : ''} ${value === a.id ? 'choice-selected' : ''}`} data-agent-name={a.name}>
                <input type="radio" name="hypervisor" value={a.id} checked={value === a.id} disabled={!!why} onChange={() => onChange(a.id)} />
                <span className="choice-main">
                  <span className="choice-title">
                    {a.name} <StatusPill status={a.status} />
                  </span>
                  <span className="choice-sub muted small">
                    {a.hostname ?? 'unknown host'} · heartbeat <RelTime ts={a.lastHeartbeat} />
                    {proxmoxNodes(a.facts).length > 0 && <> · nodes {proxmoxNodes(a.facts).join(', ')}</>}
                  </span>
                  {why && <span className="choice-why small">{why}</span>}
                </span>
              </label>
            );
          })}
        </fieldset>
      )}
      {selected && nodes.length > 1 && (
        <Field label="Proxmox node for the VM" hint="Default: the node the template lives on">
          {(p) => (
            <select {...p} value={targetNode} onChange={(e) => onTargetNode(e.target.value)}>
              <option value="">Template’s node (default)</option>
              {nodes.map((n) => (
                <option key={n} value={n}>
                  {n}
                </option>
              ))}
            </select>
          )}
        </Field>
      )}
    </div>
  );
}
