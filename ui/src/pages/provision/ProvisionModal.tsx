// The Provision Node wizard: hypervisor → template → configure → review → provisioning.
// State lives in provisionReducer.ts; each step renders from its own file. The provisioning
// step follows the real command (SSE with polling fallback) and can be re-entered later from
// node.lastCommandId while the node is `provisioning` (or `failed`).
import { useEffect, useMemo, useReducer } from 'react';
import { useQueryClient } from '@tanstack/react-query';
import { errorMessage } from '../../lib/api';
import { queryKeys, useAgents, useMutations, useNodes, useTemplates } from '../../lib/queries';
import { commandError, type Command, type VmNode } from '../../lib/types';
import { Modal } from '../../components/Modal';
import { Notice } from '../../components/ui';
import { derive, initProvisionState, provisionReducer, reachable, type Catalog } from './provisionReducer';
import { retryProvision, submitProvision } from './provisionActions';
import { Stepper } from './Stepper';
import { StepHypervisor } from './StepHypervisor';
import { StepTemplate } from './StepTemplate';
import { StepConfigure } from './StepConfigure';
import { StepReview } from './StepReview';
import { StepProvisioning } from './StepProvisioning';
import { BulkNaming, BulkReviewNames } from './BulkNaming';
import { ProvisionGrid } from './ProvisionGrid';
import { submitBatch } from './bulkSubmit';
import { loadLastChoice, saveLastChoice, withLastChoice } from './remember';

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
  const [s, dispatch] = useReducer(provisionReducer, node, (n) => withLastChoice(initProvisionState(n), loadLastChoice()));
  const qc = useQueryClient();
  const m = useMutations();
  const agents = useAgents();
  const templates = useTemplates();
  const nodes = useNodes();
  const catalog = useMemo<Catalog>(
    () => ({
      agents: agents.data ?? [],
      templates: templates.data ?? [],
      // Other nodes' names, for the duplicate warning (the node being provisioned is not "another").
      nodeNames: (nodes.data ?? []).filter((n) => n.id !== (node?.id ?? s.node?.id) && n.status !== 'destroyed').map((n) => n.name),
    }),
    [agents.data, templates.data, nodes.data, node?.id, s.node?.id],
  );
  const d = derive(s, catalog);
  const { agent, template } = d;

  // Pick the only usable hypervisor automatically (the reducer decides whether it applies,
  // e.g. only on the hypervisor step, also when "Change settings" returns there).
  useEffect(() => {
    if (catalog.agents.length > 0) dispatch({ type: 'agentsLoaded', agents: catalog.agents });
  }, [catalog.agents, s.step]);

  // Fill memory/cores from the template when the user has not set them.
  useEffect(() => {
    if (template) dispatch({ type: 'templateDefaults', template });
  }, [template]);

  const nodeId = s.node?.id ?? null;
  const next = () => dispatch({ type: 'next', catalog });
  const back = () => dispatch({ type: 'back' });
  const submit = () => {
    saveLastChoice({ agentId: s.agentId, templateId: s.templateId });
    return d.bulk ? submitBatch(s, catalog, dispatch) : submitProvision(s, catalog, m, dispatch, onNodeCreated);
  };
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
            keepOnFailure={s.keepOnFailure}
            onKeepOnFailure={(keep) => dispatch({ type: 'setKeepOnFailure', keep })}
            clone={s.clone}
            onClone={(clone) => dispatch({ type: 'setClone', clone })}
            focusField={s.serverError?.field ?? null}
            nameTaken={d.nameTaken}
            forceName={s.forceName}
            onForceName={(force) => dispatch({ type: 'setForceName', force })}
            bulk={d.bulk}
          />
        )}
        {step === 'configure' && d.isNew && (
          <BulkNaming count={s.count} onCount={(count) => dispatch({ type: 'setCount', count })} pattern={s.config.name} error={d.countError} clone={s.clone} />
        )}
        {step === 'review' && d.bulk && <BulkReviewNames count={s.count} pattern={s.config.name} clone={s.clone} />}
        {step === 'provisioning' && s.batchId && <ProvisionGrid batchId={s.batchId} />}
        {step === 'review' && agent && template && (
          <StepReview agent={agent} template={template} targetNode={s.targetNode} config={s.config} clone={s.clone} keepOnFailure={s.keepOnFailure} isNew={d.isNew} submitError={s.submitError} />
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
            onChangeSettings={(cmd) => dispatch({ type: 'changeSettings', error: commandError(cmd), params: cmd.params })}
          />
        )}
        {step === 'provisioning' && !s.commandId && !s.batchId && <Notice tone="warn">This node is provisioning but its command is unknown.</Notice>}
        {s.stepError && (
          <div className="field-error step-error" role="alert">
            {s.stepError}
          </div>
        )}
      </div>
    </Modal>
  );
}
