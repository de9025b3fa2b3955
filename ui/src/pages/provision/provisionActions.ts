// The wizard's two server round trips (submit, retry), as plain async functions over the
// mutations and the reducer's dispatch, so they can be tested without rendering.
import { ApiError, errorMessage } from '../../lib/api';
import type { Mutations } from '../../lib/queries';
import type { Command, NodeWithCommand, VmNode } from '../../lib/types';
import { derive, hypervisorUnavailable, provisionRequest, type Catalog, type ProvisionAction, type ProvisionState } from './provisionReducer';

/** The provision command a node request started (the API marks it optional). */
function startedCommand(r: NodeWithCommand): string {
  if (!r.commandId) throw new Error('The server did not start a provision command.');
  return r.commandId;
}

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
  const { config } = s;
  const provision = provisionRequest(s, agent.id);
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
        ...(s.forceName ? { force: true } : {}),
      });
      dispatch({ type: 'nodeSaved', node: r.node });
      onNodeCreated?.(r.node);
      cmdId = r.commandId;
      if (!cmdId) cmdId = startedCommand(await m.provisionNode(r.node.id, provision));
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
      cmdId = startedCommand(await m.provisionNode(cur.id, provision));
    }
    dispatch({ type: 'provisionStarted', commandId: cmdId });
  } catch (e) {
    dispatch({ type: 'submitFailed', error: errorMessage(e) });
  }
}

/**
 * Starts a new attempt after a failed provision command: a retry of that command (same
 * parameters, attempt n+1, linked to it) so the command page and the wizard show the real
 * attempt number. Only when the server refuses the retry because the node has moved on (or
 * an older server cannot retry a node's provision) is the node provisioned afresh.
 */
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
    try {
      newId = (await m.retryCommand(cmd.id)).commandId;
    } catch (e) {
      if (nodeId && e instanceof ApiError && (e.status === 409 || e.status === 404 || e.status === 405)) {
        newId = startedCommand(await m.provisionNode(nodeId, provisionRequest(s, cmd.agentId)));
      } else throw e;
    }
    dispatch({ type: 'retryStarted', commandId: newId });
  } catch (e) {
    dispatch({ type: 'retryFailed', error: errorMessage(e) });
  }
}
