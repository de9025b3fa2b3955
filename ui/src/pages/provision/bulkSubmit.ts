// Submitting a bulk provision (count > 1): one request creates the nodes and starts their
// provisions; the wizard then follows the batch in the progress grid.
import { errorMessage } from '../../lib/api';
import { bulkApi, countOf, type BatchStarted, type BulkProvisionRequest } from '../../lib/bulk';
import { derive, hypervisorUnavailable, provisionRequest, type Catalog, type ProvisionAction, type ProvisionState } from './provisionReducer';

export async function submitBatch(
  s: ProvisionState,
  catalog: Catalog,
  dispatch: (a: ProvisionAction) => void,
  send: (body: BulkProvisionRequest) => Promise<BatchStarted> = bulkApi.provision,
): Promise<void> {
  const { agent, template } = derive(s, catalog);
  if (!agent || !template) return;
  if (hypervisorUnavailable(agent)) {
    dispatch({ type: 'submitFailed', error: `${agent.name} went offline. Choose another hypervisor or wait for it to reconnect.` });
    return;
  }
  dispatch({ type: 'submitStart' });
  try {
    const r = await send({
      count: countOf(s.count),
      namePattern: s.config.name.trim(),
      templateId: template.id,
      memory: Number(s.config.memory),
      cores: Number(s.config.cores),
      application: s.config.application.trim() || null,
      provision: provisionRequest(s, agent.id),
    });
    dispatch({ type: 'batchStarted', batchId: r.batchId });
  } catch (e) {
    dispatch({ type: 'submitFailed', error: errorMessage(e) });
  }
}
