// The Provision Node wizard: hypervisor → template → configure → review → provisioning.
// The provisioning step follows the real command (SSE with polling fallback) and can be
// re-entered later from node.lastCommandId while the node is `provisioning` (or `failed`).
import { useEffect, useMemo, useRef, useState } from 'react';
import { ApiError, api, errorMessage } from '../lib/api';
import { useLiveCommand, usePolling } from '../lib/hooks';
import { commandPercent, failedStage, provisionOutcome, stageLabel } from '../lib/stages';
import type { Agent, Command, ProxmoxTemplate, Template, VmNode } from '../lib/types';
import { isTerminal } from '../lib/types';
import { formatMemory } from '../lib/time';
import { validateCores, validateMemory, validateVmName } from '../lib/validation';
import { ConfirmDialog, Modal } from '../components/Modal';
import { CopyButton, ErrorBox, Field, NodeStatusPill, Notice, ProgressBar, RelTime, Spinner, StatusPill } from '../components/ui';
import { StageList } from '../components/StageList';
import { LogViewer } from '../components/LogViewer';
import { ProxmoxPicker } from '../components/ProxmoxPicker';
import { proxmoxNodes } from './Hypervisors';

export const STEPS = ['hypervisor', 'template', 'configure', 'review', 'provisioning'] as const;
export type Step = (typeof STEPS)[number];
const STEP_LABEL: Record<Step, string> = {
  hypervisor: 'Hypervisor',
  template: 'Template',
  configure: 'Configure',
  review: 'Review',
  provisioning: 'Provisioning',
};

/** Why a hypervisor cannot take a provision command, or null when it can. */
export function hypervisorUnavailable(a: Agent): string | null {
  if (a.status !== 'online') return 'Offline — start its tendril agent to use it';
  if (!a.capabilities.includes('provision')) return 'Its agent cannot provision VMs (no provision capability)';
  return null;
}

/** The step the wizard opens on for a node. */
export function initialStep(node: VmNode | null): { step: Step; commandId: string | null } {
  // A provisioning node follows its live command; a failed one shows the error with Retry;
  // an already provisioned one shows how it went (e.g. after a reload on the success screen).
  if (node?.lastCommandId && (node.status === 'provisioning' || node.status === 'failed' || node.vmId != null)) {
    return { step: 'provisioning', commandId: node.lastCommandId };
  }
  return { step: 'hypervisor', commandId: null };
}

interface Config {
  name: string;
  memory: string;
  cores: string;
  application: string;
}

function Stepper({ step, reachable, onGo }: { step: Step; reachable: (s: Step) => boolean; onGo: (s: Step) => void }) {
  const idx = STEPS.indexOf(step);
  return (
    <ol className="stepper" aria-label="Steps">
      {STEPS.map((s, i) => {
        const state = i < idx ? 'done' : i === idx ? 'current' : 'todo';
        const can = s !== step && reachable(s);
        return (
          <li key={s} className={`step step-${state}`} aria-current={state === 'current' ? 'step' : undefined} data-step={s}>
            {can ? (
              <button type="button" className="step-btn" onClick={() => onGo(s)}>
                <span className="step-no">{state === 'done' ? '✓' : i + 1}</span>
                <span className="step-label">{STEP_LABEL[s]}</span>
              </button>
            ) : (
              <span className="step-btn">
                <span className="step-no">{state === 'done' ? '✓' : i + 1}</span>
                <span className="step-label">{STEP_LABEL[s]}</span>
              </span>
            )}
          </li>
        );
      })}
    </ol>
  );
}

function HypervisorStep({
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

function TemplateStep({
  templates,
  loading,
  error,
  value,
  onChange,
  agents,
  agentId,
  onCreated,
}: {
  templates: Template[];
  loading: boolean;
  error: string | null;
  value: string;
  onChange: (id: string) => void;
  agents: Agent[];
  agentId: string;
  onCreated: (t: Template) => void;
}) {
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
      const t = await api.createTemplate({
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
      onCreated(t);
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

export function configErrors(c: Config, needName: boolean): Partial<Record<keyof Config, string | null>> {
  return {
    name: needName ? validateVmName(c.name) : null,
    memory: validateMemory(c.memory),
    cores: validateCores(c.cores),
  };
}

function ConfigureStep({
  config,
  onChange,
  errors,
  showAll,
  isNew,
  nameEditable,
}: {
  config: Config;
  onChange: (c: Config) => void;
  errors: Partial<Record<keyof Config, string | null>>;
  showAll: boolean;
  isNew: boolean;
  nameEditable: boolean;
}) {
  const [dirty, setDirty] = useState<Partial<Record<keyof Config, boolean>>>({});
  const set = (k: keyof Config) => (e: { target: { value: string } }) => {
    setDirty((d) => ({ ...d, [k]: true }));
    onChange({ ...config, [k]: e.target.value });
  };
  const err = (k: keyof Config) => (showAll || dirty[k] ? errors[k] : null);
  return (
    <div className="grid2" data-testid="configure-step">
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
  );
}

function ProvisioningStep({
  commandId,
  nodeId,
  onNodeSettled,
  onRetry,
  onChangeSettings,
  retrying,
  retryError,
}: {
  commandId: string;
  nodeId: string | null;
  /** The node record reached its post-command state (refresh lists). */
  onNodeSettled: () => void;
  onRetry: (cmd: Command) => void;
  onChangeSettings: () => void;
  retrying: boolean;
  retryError: string | null;
}) {
  const live = useLiveCommand(commandId);
  const cmd = live.command;
  const [node, setNode] = useState<VmNode | null>(null);
  const [showLog, setShowLog] = useState(false);
  const [confirmCancel, setConfirmCancel] = useState(false);
  const [cancelErr, setCancelErr] = useState<string | null>(null);
  const agent = usePolling(() => (cmd ? api.getAgent(cmd.agentId) : Promise.resolve(null)), 0, [cmd?.agentId]);
  const status = cmd?.status;

  const settledRef = useRef(onNodeSettled);
  settledRef.current = onNodeSettled;
  // After the command ends, the control plane updates the node; follow it until it settles.
  useEffect(() => {
    if (!nodeId || !status || !isTerminal(status)) return;
    let alive = true;
    let n = 0;
    const tick = async () => {
      try {
        const nd = await api.getNode(nodeId);
        if (!alive) return;
        setNode(nd);
        if (nd.status === 'provisioning' && n++ < 20) setTimeout(tick, 1000);
        else settledRef.current();
      } catch {
        /* the node may have been deleted */
      }
    };
    void tick();
    return () => {
      alive = false;
    };
  }, [nodeId, status]);

  if (!cmd) {
    return live.error ? <ErrorBox title="Cannot load the provision command">{live.error}</ErrorBox> : <Spinner label="Loading command" />;
  }
  const out = provisionOutcome(cmd.result);
  const vmId = node?.vmId ?? out.vmId;
  const ip = node?.ipAddress ?? out.ip;
  const failed = ['failed', 'timed_out', 'cancelled'].includes(cmd.status);
  const fstage = failed ? failedStage(cmd) : null;
  const percent = commandPercent(cmd);

  return (
    <div data-testid="provisioning-step" data-command-id={cmd.id} data-status={cmd.status}>
      <div className="prov-head">
        <StatusPill status={cmd.status} />
        <span className="muted small">
          on {agent.data?.name ?? 'hypervisor'} · attempt {cmd.attempt} ·{' '}
          <a href={`#/commands/${cmd.id}`} onClick={() => undefined}>
            command {cmd.id.slice(0, 8)}
          </a>
          {live.streamState === 'polling' && ' · polling'}
          {live.streamState === 'reconnecting' && ' · reconnecting…'}
        </span>
      </div>
      <ProgressBar percent={percent} tone={failed ? 'bad' : cmd.status === 'succeeded' ? 'ok' : 'info'} />
      <StageList type="provision" stages={cmd.stages} failed={fstage} />
      {cmd.status === 'queued' && <Notice>Waiting for the hypervisor to pick up the command…</Notice>}
      {cmd.status === 'succeeded' && (
        <div className="success-box" role="status" data-testid="provision-success">
          <strong>VM ready</strong>
          <div className="kv">
            <span className="kv-k">VM id</span>
            <span data-testid="result-vmid">{vmId ?? '–'}</span>
            <span className="kv-k">IP address</span>
            <span>
              <span data-testid="result-ip">{ip ?? 'not reported'}</span> {ip && <CopyButton text={ip} label="Copy" />}
            </span>
            {out.node && (
              <>
                <span className="kv-k">Proxmox node</span>
                <span>{out.node}</span>
              </>
            )}
            {node && (
              <>
                <span className="kv-k">Node status</span>
                <NodeStatusPill status={node.status} />
              </>
            )}
          </div>
        </div>
      )}
      {failed && (
        <div className="errorbox" role="alert" data-testid="provision-error">
          <strong>
            Provisioning {cmd.status === 'cancelled' ? 'was cancelled' : cmd.status === 'timed_out' ? 'timed out' : 'failed'}
            {fstage ? ` at “${stageLabel(fstage)}”` : ''}
          </strong>
          {cmd.error && (
            <div>
              <code className="err-code" data-testid="error-code">{cmd.error.code}</code> <span data-testid="error-message">{cmd.error.message}</span>
              {cmd.error.retryable && <span className="muted small"> (retryable)</span>}
            </div>
          )}
          <div className="btn-row">
            <button type="button" className="btn btn-primary" onClick={() => onRetry(cmd)} disabled={retrying} data-testid="provision-retry">
              {retrying ? 'Retrying…' : 'Retry'}
            </button>
            <button type="button" className="btn" onClick={onChangeSettings}>
              Change settings
            </button>
          </div>
          {retryError && <div className="field-error">{retryError}</div>}
        </div>
      )}
      {!isTerminal(cmd.status) && (
        <div className="btn-row">
          <span className="muted small">You can close this window; provisioning continues and can be reopened from the node.</span>
          <button type="button" className="btn btn-sm btn-danger-ghost" onClick={() => setConfirmCancel(true)} disabled={cmd.cancelRequested}>
            {cmd.cancelRequested ? 'Cancelling…' : 'Cancel provisioning'}
          </button>
        </div>
      )}
      <button type="button" className="btn btn-sm btn-ghost-dark" aria-expanded={showLog} onClick={() => setShowLog(!showLog)}>
        {showLog ? 'Hide agent log' : 'Show agent log'}
      </button>
      {showLog && <LogViewer buffer={live.logs} height={220} live={!isTerminal(cmd.status)} />}
      {confirmCancel && (
        <ConfirmDialog
          title="Cancel provisioning?"
          confirmLabel="Cancel provisioning"
          danger
          error={cancelErr}
          onCancel={() => setConfirmCancel(false)}
          onConfirm={async () => {
            try {
              await api.cancelCommand(cmd.id);
              setConfirmCancel(false);
              live.refresh();
            } catch (e) {
              setCancelErr(errorMessage(e));
            }
          }}
        >
          <p>The agent stops after the current step and removes the half-built VM.</p>
        </ConfirmDialog>
      )}
    </div>
  );
}

export function ProvisionModal({
  node,
  onClose,
  onChanged,
  onNodeCreated,
}: {
  node: VmNode | null;
  onClose: () => void;
  onChanged: () => void;
  /** Called when the wizard created a node (new-node mode), e.g. to put its id in the URL. */
  onNodeCreated?: (node: VmNode) => void;
}) {
  const init = useMemo(() => initialStep(node), [node]);
  const [step, setStep] = useState<Step>(init.step);
  const [commandId, setCommandId] = useState<string | null>(init.commandId);
  const [nodeRec, setNodeRec] = useState<VmNode | null>(node);
  const nodeId = nodeRec?.id ?? null;
  const [agentId, setAgentId] = useState<string>(node?.hypervisorId ?? '');
  const [targetNode, setTargetNode] = useState('');
  const [templateId, setTemplateId] = useState<string>(node?.templateId ?? '');
  const [config, setConfig] = useState<Config>({
    name: node?.name ?? '',
    memory: node ? String(node.memory) : '',
    cores: node ? String(node.cores) : '',
    application: node?.application ?? '',
  });
  const [showAll, setShowAll] = useState(false);
  const [submitting, setSubmitting] = useState(false);
  const [submitErr, setSubmitErr] = useState<string | null>(null);
  const [retrying, setRetrying] = useState(false);
  const [retryErr, setRetryErr] = useState<string | null>(null);
  const [stepErr, setStepErr] = useState<string | null>(null);

  const agents = usePolling((s) => api.listAgents(s), step === 'provisioning' ? 0 : 2500, [step === 'provisioning']);
  const templates = usePolling((s) => api.listTemplates(s), 0, []);
  const agentList = useMemo(() => agents.data?.items ?? [], [agents.data]);
  const templateList = useMemo(() => templates.data?.items ?? [], [templates.data]);
  const agent = agentList.find((a) => a.id === agentId);
  const template = templateList.find((t) => t.id === templateId);

  // Pick the only usable hypervisor automatically; drop a selection that became unusable.
  const autoPicked = useRef(false);
  useEffect(() => {
    if (step !== 'hypervisor' || agentList.length === 0) return;
    const usable = agentList.filter((a) => !hypervisorUnavailable(a));
    if (!agentId && !autoPicked.current && usable.length === 1) {
      autoPicked.current = true;
      setAgentId(usable[0].id);
    }
  }, [agentList, agentId, step]);

  // Fill memory/cores from the template when the user has not set them.
  useEffect(() => {
    if (!template) return;
    setConfig((c) => ({
      ...c,
      memory: c.memory || String(template.memory),
      cores: c.cores || String(template.cores),
    }));
  }, [template]);

  const isNew = nodeRec === null;
  const nameEditable = !nodeRec || nodeRec.vmId === null;
  const cfgErrors = configErrors(config, nameEditable);
  const cfgValid = !Object.values(cfgErrors).some(Boolean);
  const agentOk = !!agent && !hypervisorUnavailable(agent);
  const templateOk = !!template && template.proxmoxTemplateId != null;

  const reachable = (s: Step): boolean => {
    if (step === 'provisioning') return false;
    switch (s) {
      case 'hypervisor':
        return true;
      case 'template':
        return agentOk;
      case 'configure':
        return agentOk && templateOk;
      case 'review':
        return agentOk && templateOk && cfgValid;
      default:
        return false;
    }
  };

  const next = () => {
    setStepErr(null);
    if (step === 'hypervisor') {
      if (!agent) return setStepErr('Choose a hypervisor.');
      const why = hypervisorUnavailable(agent);
      if (why) return setStepErr(`${agent.name}: ${why}.`);
      setStep('template');
    } else if (step === 'template') {
      if (!template) return setStepErr('Choose a template.');
      if (template.proxmoxTemplateId == null) return setStepErr(`${template.name} is not mapped to a Proxmox template.`);
      setStep('configure');
    } else if (step === 'configure') {
      setShowAll(true);
      if (!cfgValid) return setStepErr('Fix the highlighted fields.');
      setStep('review');
    }
  };
  const back = () => {
    setStepErr(null);
    const i = STEPS.indexOf(step);
    if (i > 0 && step !== 'provisioning') setStep(STEPS[i - 1]);
  };

  const submit = async () => {
    if (!agent || !template) return;
    if (hypervisorUnavailable(agent)) {
      setSubmitErr(`${agent.name} went offline. Choose another hypervisor or wait for it to reconnect.`);
      return;
    }
    setSubmitting(true);
    setSubmitErr(null);
    const provision = { agentId: agent.id, ...(targetNode ? { targetNode } : {}) };
    try {
      let cmdId: string | null | undefined;
      let nid = nodeId;
      if (!nid) {
        const r = await api.createNode({
          name: config.name.trim(),
          templateId: template.id,
          memory: Number(config.memory),
          cores: Number(config.cores),
          application: config.application.trim() || null,
          provision,
        });
        nid = r.node.id;
        setNodeRec(r.node);
        onNodeCreated?.(r.node);
        cmdId = r.commandId;
        if (!cmdId) cmdId = (await api.provisionNode(nid, provision)).commandId;
      } else {
        const cur = nodeRec ?? (await api.getNode(nid));
        const changed =
          cur.name !== config.name.trim() ||
          cur.memory !== Number(config.memory) ||
          cur.cores !== Number(config.cores) ||
          cur.templateId !== template.id;
        if (changed) {
          const updated = await api.updateNode(nid, {
            name: config.name.trim(),
            memory: Number(config.memory),
            cores: Number(config.cores),
            templateId: template.id,
          });
          // PUT answers the Node (tolerate a {node} wrapper).
          const u = updated as VmNode | { node: VmNode } | undefined;
          setNodeRec(u && 'node' in u ? u.node : (u ?? cur));
        }
        cmdId = (await api.provisionNode(nid, provision)).commandId;
      }
      setCommandId(cmdId);
      setStep('provisioning');
      onChanged();
    } catch (e) {
      setSubmitErr(errorMessage(e));
    } finally {
      setSubmitting(false);
    }
  };

  const retry = async (cmd: Command) => {
    setRetrying(true);
    setRetryErr(null);
    try {
      let newId: string;
      if (nodeId) {
        try {
          newId = (await api.provisionNode(nodeId, { agentId: cmd.agentId, ...(targetNode ? { targetNode } : {}) })).commandId;
        } catch (e) {
          // Older servers without re-provision of failed nodes: retry the command itself.
          if (e instanceof ApiError && (e.status === 404 || e.status === 405)) newId = (await api.retryCommand(cmd.id)).commandId;
          else throw e;
        }
      } else {
        newId = (await api.retryCommand(cmd.id)).commandId;
      }
      setCommandId(newId);
      onChanged();
    } catch (e) {
      setRetryErr(errorMessage(e));
    } finally {
      setRetrying(false);
    }
  };

  const title = node ? `Provision ${node.name}` : nodeId ? `Provision ${config.name}` : 'Provision new node';

  const footer =
    step === 'provisioning' ? (
      <button type="button" className="btn" onClick={onClose} data-testid="provision-close">
        Close
      </button>
    ) : (
      <>
        <button type="button" className="btn" onClick={onClose}>
          Cancel
        </button>
        <span className="spacer" />
        {step !== 'hypervisor' && (
          <button type="button" className="btn" onClick={back} data-testid="wizard-back">
            Back
          </button>
        )}
        {step === 'review' ? (
          <button type="button" className="btn btn-primary" onClick={submit} disabled={submitting} data-testid="wizard-submit">
            {submitting ? 'Starting…' : 'Provision'}
          </button>
        ) : (
          <button type="button" className="btn btn-primary" onClick={next} data-testid="wizard-next">
            Next
          </button>
        )}
      </>
    );

  return (
    <Modal title={title} onClose={onClose} wide footer={footer} testId="provision-modal">
      <Stepper step={step} reachable={reachable} onGo={(s) => { setStepErr(null); setStep(s); }} />
      <div className="wizard-body" data-current-step={step}>
        {step === 'hypervisor' && (
          <HypervisorStep
            agents={agentList}
            loading={agents.loading}
            error={agents.error}
            value={agentId}
            onChange={setAgentId}
            targetNode={targetNode}
            onTargetNode={setTargetNode}
          />
        )}
        {step === 'template' && (
          <TemplateStep
            templates={templateList}
            loading={templates.loading}
            error={templates.error}
            value={templateId}
            onChange={setTemplateId}
            agents={agentList}
            agentId={agentId}
            onCreated={(t) => {
              templates.reload();
              setTemplateId(t.id);
            }}
          />
        )}
        {step === 'configure' && (
          <ConfigureStep config={config} onChange={setConfig} errors={cfgErrors} showAll={showAll} isNew={isNew} nameEditable={nameEditable} />
        )}
        {step === 'review' && agent && template && (
          <div data-testid="review-step">
            <dl className="review">
              <dt>Hypervisor</dt>
              <dd>
                {agent.name} <StatusPill status={agent.status} />
              </dd>
              <dt>Proxmox node</dt>
              <dd>{targetNode || template.proxmoxNode || 'template’s node'}</dd>
              <dt>Template</dt>
              <dd>
                {template.name} <span className="muted">(Proxmox VMID {template.proxmoxTemplateId})</span>
              </dd>
              <dt>VM name</dt>
              <dd data-testid="review-name">{config.name}</dd>
              {isNew && config.application.trim() && (
                <>
                  <dt>Application</dt>
                  <dd>{config.application}</dd>
                </>
              )}
              <dt>Memory</dt>
              <dd>
                {config.memory} MiB <span className="muted">({formatMemory(Number(config.memory))})</span>
              </dd>
              <dt>Cores</dt>
              <dd>{config.cores}</dd>
              {template.networkBridge && (
                <>
                  <dt>Network bridge</dt>
                  <dd>{template.networkBridge}</dd>
                </>
              )}
              {template.postProvisionCommands.length > 0 && (
                <>
                  <dt>Post-provision</dt>
                  <dd>
                    <pre className="mini-pre">{template.postProvisionCommands.join('\n')}</pre>
                  </dd>
                </>
              )}
            </dl>
            {agent.status !== 'online' && <Notice tone="warn">{agent.name} is offline right now.</Notice>}
            {submitErr && <ErrorBox title="Could not start provisioning">{submitErr}</ErrorBox>}
          </div>
        )}
        {step === 'provisioning' && commandId && (
          <ProvisioningStep
            key={commandId}
            commandId={commandId}
            nodeId={nodeId}
            onNodeSettled={onChanged}
            onRetry={retry}
            retrying={retrying}
            retryError={retryErr}
            onChangeSettings={() => {
              setCommandId(null);
              setRetryErr(null);
              setStep('hypervisor');
            }}
          />
        )}
        {step === 'provisioning' && !commandId && <Notice tone="warn">This node is provisioning but its command is unknown.</Notice>}
        {stepErr && (
          <div className="field-error step-error" role="alert">
            {stepErr}
          </div>
        )}
      </div>
    </Modal>
  );
}
