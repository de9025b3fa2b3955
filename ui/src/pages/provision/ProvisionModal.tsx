// The Provision Node wizard: hypervisor → template → configure → review → provisioning.
// State lives in provisionReducer.ts; each step renders from its own file. The provisioning
// step follows the real command (SSE with polling fallback) and can be re-entered later from
// node.lastCommandId while the node is `provisioning` (or `failed`).
import { useEffect, useMemo, useReducer } from 'react';
import { useQueryClient } from '@tanstack/react-query';
import { ApiError, errorMessage } from '../../lib/api';
import { queryKeys, useAgents, useMutations, useTemplates, type Mutations } from '../../lib/queries';
import type { Command, VmNode } from '../../lib/types';
import { Modal } from '../../components/Modal';
import { Notice } from '../../components/ui';
import {
  derive,
  hypervisorUnavailable,
  initProvisionState,
  provisionReducer,
  reachable,
  type Catalog,
  type ProvisionAction,
  type ProvisionState,
} from './provisionReducer';
import { Stepper } from './Stepper';
import { StepHypervisor } from './StepHypervisor';
import { StepTemplate } from './StepTemplate';
import { StepConfigure } from './StepConfigure';
import { StepReview } from './StepReview';
import { StepProvisioning } from './StepProvisioning';

/**
 * Sends the reviewed settings: creates the node (new-node mode) or saves changed settings,
 * then starts the provision command. Reports progress through `dispatch`.
 */
export async function submitProvision(
  s: ProvisionState,
  catalog: Catalog,
  m: Pick<Mutations, 'createNode' | 'updateNode' | 'provisionNode'>,
  dispatch: (a: ProvisionAction) => void,
  onNodeCreated?: (node: VmNode) => void,
): Promise<void> {
  const { agent, template } = derive(s, catalog);
  if (!agent || !template) return;
  if (hypervisorUnavailable(agent)) {
    dispatch({ type: 'submitFailed', error: `${agent.name} went offline. Choose another hypervisor or wait for it to reconnect.` });
    return;
  }
  dispatch({ type: 'submitStart' });
  const { config, targetNode } = s;
  const provision = { agentId: agent.id, ...(targetNode ? { targetNode } : {}) };
  try {
    let cmdId: string | null | undefined;
    const cur = s.node;
    if (!cur) {
      const r = await m.createNode({
        name: config.name.trim(),
        templateId: template.id,
        memory: Number(config.memory),
        cores: Number(config.cores),
        application: config.application.trim() || null,
        provision,
      });
      dispatch({ type: 'nodeSaved', node: r.node });
      onNodeCreated?.(r.node);
      cmdId = r.commandId;
      if (!cmdId) cmdId = (await m.provisionNode(r.node.id, provision)).commandId;
    } else {
      const changed =
        cur.name !== config.name.trim() ||
        cur.memory !== Number(config.memory) ||
        cur.cores !== Number(config.cores) ||
        cur.templateId !== template.id;
      if (changed) {
        const updated = await m.updateNode(cur.id, {
          name: config.name.trim(),
          memory: Number(config.memory),
          cores: Number(config.cores),
          templateId: template.id,
        });
        // PUT answers the Node (tolerate a {node} wrapper).
        const u = updated as VmNode | { node: VmNode } | undefined;
        dispatch({ type: 'nodeSaved', node: u && 'node' in u ? u.node : (u ?? cur) });
      }
      cmdId = (await m.provisionNode(cur.id, provision)).commandId;
    }
    dispatch({ type: 'provisionStarted', commandId: cmdId });
  } catch (e) {
    dispatch({ type: 'submitFailed', error: errorMessage(e) });
  }
}

/** Starts a new attempt after a failed provision command. */
export async function retryProvision(
  s: ProvisionState,
  cmd: Command,
  m: Pick<Mutations, 'provisionNode' | 'retryCommand'>,
  dispatch: (a: ProvisionAction) => void,
): Promise<void> {
  dispatch({ type: 'retryStart' });
  const nodeId = s.node?.id ?? null;
  try {
    let newId: string;
    if (nodeId) {
      try {
        newId = (await m.provisionNode(nodeId, { agentId: cmd.agentId, ...(s.targetNode ? { targetNode: s.targetNode } : {}) })).commandId;
      } catch (e) {
        // Older servers without re-provision of failed nodes: retry the command itself.
        if (e instanceof ApiError && (e.status === 404 || e.status === 405)) newId = (await m.retryCommand(cmd.id)).commandId;
        else throw e;
      }
    } else {
      newId = (await m.retryCommand(cmd.id)).commandId;
    }
    dispatch({ type: 'retryStarted', commandId: newId });
  } catch (e) {
    dispatch({ type: 'retryFailed', error: errorMessage(e) });
  }
}

export function ProvisionModal({
  node,
  onClose,
  onNodeCreated,
}: {
  node: VmNode | null;
  onClose: () => void;
  /** Called when the wizard created a node (new-node mode), e.g. to put its id in the URL. */
  onNodeCreated?: (node: VmNode) => void;
}) {
  const [s, dispatch] = useReducer(provisionReducer, node, initProvisionState);
  const qc = useQueryClient();
  const m = useMutations();
  const agents = useAgents();
  const templates = useTemplates();
  const catalog = useMemo<Catalog>(() => ({ agents: agents.data ?? [], templates: templates.data ?? [] }), [agents.data, templates.data]);
  const d = derive(s, catalog);
  const { agent, template } = d;

  // Pick the only usable hypervisor automatically (the reducer decides whether it applies).
  useEffect(() => {
    if (catalog.agents.length > 0) dispatch({ type: 'agentsLoaded', agents: catalog.agents });
  }, [catalog.agents]);

  // Fill memory/cores from the template when the user has not set them.
  useEffect(() => {
    if (template) dispatch({ type: 'templateDefaults', template });
  }, [template]);

  const nodeId = s.node?.id ?? null;
  const next = () => dispatch({ type: 'next', catalog });
  const back = () => dispatch({ type: 'back' });
  const submit = () => submitProvision(s, catalog, m, dispatch, onNodeCreated);
  const retry = (cmd: Command) => void retryProvision(s, cmd, m, dispatch);

  const title = node ? `Provision ${node.name}` : nodeId ? `Provision ${s.config.name}` : 'Provision new node';
  const step = s.step;

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
          <button type="button" className="btn btn-primary" onClick={submit} disabled={s.submitting} data-testid="wizard-submit">
            {s.submitting ? 'Starting…' : 'Provision'}
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
      <Stepper step={step} reachable={(to) => reachable(s, catalog, to)} onGo={(to) => dispatch({ type: 'goTo', step: to, catalog })} />
      <div className="wizard-body" data-current-step={step}>
        {step === 'hypervisor' && (
          <StepHypervisor
            agents={catalog.agents}
            loading={agents.isPending}
            error={agents.error ? errorMessage(agents.error) : null}
            value={s.agentId}
            onChange={(agentId) => dispatch({ type: 'selectAgent', agentId })}
            targetNode={s.targetNode}
            onTargetNode={(targetNode) => dispatch({ type: 'setTargetNode', targetNode })}
          />
        )}
        {step === 'template' && (
          <StepTemplate
            templates={catalog.templates}
            loading={templates.isPending}
            error={templates.error ? errorMessage(templates.error) : null}
            value={s.templateId}
            onChange={(templateId) => dispatch({ type: 'selectTemplate', templateId })}
            agents={catalog.agents}
            agentId={s.agentId}
          />
        )}
        {step === 'configure' && (
          <StepConfigure
            config={s.config}
            onChange={(config) => dispatch({ type: 'setConfig', config })}
            errors={d.configErrors}
            showAll={s.showAllErrors}
            isNew={d.isNew}
            nameEditable={d.nameEditable}
          />
        )}
        {step === 'review' && agent && template && (
          <StepReview agent={agent} template={template} targetNode={s.targetNode} config={s.config} isNew={d.isNew} submitError={s.submitError} />
        )}
        {step === 'provisioning' && s.commandId && (
          <StepProvisioning
            key={s.commandId}
            commandId={s.commandId}
            nodeId={nodeId}
            onNodeSettled={() => void qc.invalidateQueries({ queryKey: queryKeys.nodes })}
            onRetry={retry}
            retrying={s.retrying}
            retryError={s.retryError}
            onChangeSettings={() => dispatch({ type: 'changeSettings' })}
          />
        )}
        {step === 'provisioning' && !s.commandId && <Notice tone="warn">This node is provisioning but its command is unknown.</Notice>}
        {s.stepError && (
          <div className="field-error step-error" role="alert">
            {s.stepError}
          </div>
        )}
      </div>
    </Modal>
  );
}
