import { useState } from 'react';
import { errorMessage } from '../../lib/api';
import { useMutations } from '../../lib/queries';
import type { Agent, ProxmoxTemplate, Template } from '../../lib/types';
import { formatMemory } from '../../lib/time';
import { ErrorBox, Notice, Spinner } from '../../components/ui';
import { ProxmoxPicker } from '../../components/ProxmoxPicker';

/** Step 2: the Trellis template, with a helper that maps one from the hypervisor's Proxmox templates. */
export function StepTemplate({
  templates,
  loading,
  error,
  value,
  onChange,
  agents,
  agentId,
}: {
  templates: Template[];
  loading: boolean;
  error: string | null;
  value: string;
  onChange: (id: string) => void;
  agents: Agent[];
  agentId: string;
}) {
  const m = useMutations();
  const [helper, setHelper] = useState(false);
  const [helperErr, setHelperErr] = useState<string | null>(null);
  const pick = async (pt: ProxmoxTemplate) => {
    setHelperErr(null);
    const existing = templates.find((t) => t.proxmoxTemplateId === pt.vmid && (!t.proxmoxNode || t.proxmoxNode === pt.node));
    if (existing) {
      onChange(existing.id);
      return;
    }
    try {
      // Creating it refreshes the shared template list (the new one shows up in the choices).
      const t = await m.createTemplate({
        name: pt.name,
        description: `Proxmox template ${pt.vmid} on ${pt.node}`,
        memory: pt.memory || 2048,
        cores: pt.cores || 2,
        proxmoxTemplateId: pt.vmid,
        proxmoxNode: pt.node,
        networkBridge: null,
        preProvisionCommands: [],
        postProvisionCommands: [],
      });
      onChange(t.id);
    } catch (e) {
      setHelperErr(errorMessage(e));
    }
  };
  if (loading && templates.length === 0) return <Spinner />;
  return (
    <div>
      {error && <ErrorBox>{error}</ErrorBox>}
      {templates.length === 0 ? (
        <Notice>No Trellis templates yet. Use the helper below to create one from a Proxmox template.</Notice>
      ) : (
        <fieldset className="choice-list" data-testid="template-choices">
          <legend>Choose a template</legend>
          {templates.map((t) => {
            const unmapped = t.proxmoxTemplateId == null;
            return (
              <label key={t.id} className={`choice ${unmapped ? 'choice-disabled' : ''} ${value === t.id ? 'choice-selected' : ''}`} data-template-name={t.name}>
                <input type="radio" name="template" value={t.id} checked={value === t.id} disabled={unmapped} onChange={() => onChange(t.id)} />
                <span className="choice-main">
                  <span className="choice-title">
                    {t.name}{' '}
                    {unmapped ? <span className="tag tag-warn">not mapped to a Proxmox template</span> : <span className="tag">VMID {t.proxmoxTemplateId}</span>}
                  </span>
                  <span className="choice-sub muted small">
                    {formatMemory(t.memory)} · {t.cores} cores{t.proxmoxNode ? ` · on ${t.proxmoxNode}` : ''}
                    {t.networkBridge ? ` · ${t.networkBridge}` : ''}
                    {t.postProvisionCommands.length > 0 ? ` · ${t.postProvisionCommands.length} post-provision command(s)` : ''}
                  </span>
                  {unmapped && <span className="choice-why small">Set its Proxmox template VMID on the Templates page to use it.</span>}
                </span>
              </label>
            );
          })}
        </fieldset>
      )}
      <button type="button" className="btn btn-sm" aria-expanded={helper} onClick={() => setHelper(!helper)} data-testid="show-proxmox-templates">
        {helper ? 'Hide Proxmox templates' : 'Show the hypervisor’s Proxmox templates…'}
      </button>
      {helper && (
        <div className="picker-box">
          <p className="muted small">Choosing one selects the Trellis template mapped to it, or creates one.</p>
          <ProxmoxPicker
            agents={agents}
            initialAgentId={agentId || undefined}
            selectedVmid={templates.find((t) => t.id === value)?.proxmoxTemplateId ?? null}
            onPick={(pt) => void pick(pt)}
          />
          {helperErr && <ErrorBox title="Could not create the template">{helperErr}</ErrorBox>}
        </div>
      )}
    </div>
  );
}
