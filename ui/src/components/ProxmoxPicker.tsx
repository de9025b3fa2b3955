// Lists the Proxmox VM templates a hypervisor really has (GET /api/agents/:id/templates) and
// lets the user pick one.
import { useEffect, useState } from 'react';
import { ApiError, api, errorMessage } from '../lib/api';
import type { Agent, ProxmoxTemplate } from '../lib/types';
import { formatBytes, formatMemory } from '../lib/time';
import { ErrorBox, Field, Spinner } from './ui';

export function templatesErrorMessage(e: unknown, agent?: Agent): string {
  const name = agent?.name ?? 'The hypervisor';
  if (e instanceof ApiError) {
    if (e.code === 'agent_offline') return `${name} is offline, so its Proxmox templates cannot be listed. Start its tendril agent and try again.`;
    if (e.code === 'capability_missing') return `${name} cannot list templates (its agent lacks the list_templates capability).`;
    if (e.code === 'agent_timeout' || e.status === 504) return `${name} did not answer in time. Check the agent and its Proxmox connection, then retry.`;
  }
  return errorMessage(e);
}

export function ProxmoxPicker({
  agents,
  initialAgentId,
  selectedVmid,
  onPick,
}: {
  agents: Agent[];
  initialAgentId?: string;
  selectedVmid?: number | null;
  onPick: (t: ProxmoxTemplate, agent: Agent) => void;
}) {
  const candidates = agents.filter((a) => a.capabilities.includes('list_templates') || a.capabilities.includes('provision'));
  const [agentId, setAgentId] = useState(
    () => initialAgentId ?? candidates.find((a) => a.status === 'online')?.id ?? candidates[0]?.id ?? '',
  );
  const [state, setState] = useState<{ loading: boolean; error: string | null; items: ProxmoxTemplate[] | null }>({
    loading: false,
    error: null,
    items: null,
  });
  const [tick, setTick] = useState(0);
  const agent = agents.find((a) => a.id === agentId);

  useEffect(() => {
    if (!agentId) return;
    const ctrl = new AbortController();
    setState({ loading: true, error: null, items: null });
    api
      .agentTemplates(agentId, ctrl.signal)
      .then((r) => setState({ loading: false, error: null, items: r.templates }))
      .catch((e) => {
        if (e instanceof DOMException && e.name === 'AbortError') return;
        setState({ loading: false, error: templatesErrorMessage(e, agents.find((a) => a.id === agentId)), items: null });
      });
    return () => ctrl.abort();
    // agents changes every poll; only re-run on a different agent or an explicit refresh
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [agentId, tick]);

  if (candidates.length === 0) return <p className="muted small">No hypervisor can list Proxmox templates yet.</p>;

  return (
    <div className="picker" data-testid="proxmox-picker">
      <div className="picker-head">
        <Field label="Hypervisor">
          {(p) => (
            <select {...p} value={agentId} onChange={(e) => setAgentId(e.target.value)}>
              {candidates.map((a) => (
                <option key={a.id} value={a.id}>
                  {a.name} ({a.status})
                </option>
              ))}
            </select>
          )}
        </Field>
        <button type="button" className="btn btn-sm" onClick={() => setTick((t) => t + 1)} disabled={state.loading}>
          Refresh
        </button>
      </div>
      {agent?.status === 'offline' && !state.loading && !state.items && !state.error && (
        <p className="muted small">{agent.name} is offline.</p>
      )}
      {state.loading && (
        <div className="muted small">
          <Spinner label="Asking the hypervisor" /> Asking {agent?.name ?? 'the hypervisor'} for its Proxmox templates…
        </div>
      )}
      {state.error && <ErrorBox title="Cannot list Proxmox templates">{state.error}</ErrorBox>}
      {state.items && state.items.length === 0 && <p className="muted small">No VM templates on this hypervisor.</p>}
      {state.items && state.items.length > 0 && (
        <div className="table-wrap picker-list">
          <table className="table table-compact">
            <thead>
              <tr>
                <th>VMID</th>
                <th>Name</th>
                <th>Node</th>
                <th>Memory</th>
                <th>Cores</th>
                <th className="hide-sm">Disk</th>
                <th />
              </tr>
            </thead>
            <tbody>
              {state.items.map((t) => (
                <tr key={`${t.node}/${t.vmid}`} className={selectedVmid === t.vmid ? 'row-selected' : ''} data-vmid={t.vmid}>
                  <td>{t.vmid}</td>
                  <td>{t.name}</td>
                  <td>{t.node}</td>
                  <td>{formatMemory(t.memory)}</td>
                  <td>{t.cores}</td>
                  <td className="hide-sm">{formatBytes(t.diskBytes)}</td>
                  <td>
                    <button type="button" className="btn btn-sm" onClick={() => agent && onPick(t, agent)}>
                      {selectedVmid === t.vmid ? 'Selected' : 'Use'}
                    </button>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      )}
    </div>
  );
}
