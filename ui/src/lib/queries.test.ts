import { afterEach, beforeAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { QueryObserver, environmentManager, type QueryClient } from '@tanstack/react-query';
import { api } from './api';
import {
  NODE_FOLLOW_MAX_READS,
  POLL_MS,
  agentVmsQuery,
  agentsQuery,
  commandQuery,
  commandsQuery,
  createQueryClient,
  mutations,
  nodeAfterCommandQuery,
  nodeSettled,
  nodesQuery,
  queryKeys,
  templatesQuery,
} from './queries';
import type { Agent, VmNode } from './types';

const agentA = { id: 'a1', name: 'pve-1' } as Agent;
const node = (status: VmNode['status']) => ({ id: 'n1', status }) as VmNode;

let qc: QueryClient;
// Tests run in Node, where TanStack Query would otherwise act as on a server (no timers).
beforeAll(() => environmentManager.setIsServer(() => false));
beforeEach(() => {
  qc = createQueryClient();
});
afterEach(() => {
  qc.clear();
  vi.restoreAllMocks();
  vi.useRealTimers();
});

describe('query keys and options', () => {
  it('one key per resource', () => {
    expect(agentsQuery().queryKey).toEqual(['agents']);
    expect(templatesQuery().queryKey).toEqual(['templates']);
    expect(nodesQuery().queryKey).toEqual(['nodes']);
    expect(queryKeys.node('n1')).toEqual(['node', 'n1']);
    expect(queryKeys.command('c1')).toEqual(['command', 'c1']);
    expect(commandsQuery({ status: 'failed', limit: 100 }).queryKey).toEqual(['commands', { status: 'failed', limit: 100 }]);
  });

  it("a hypervisor's VMs are polled under ['agentVms', id]; one command is read once it is terminal", async () => {
    expect(agentVmsQuery('a1').queryKey).toEqual(['agentVms', 'a1']);
    expect(agentVmsQuery('a1').refetchInterval).toBe(POLL_MS);
    const vms = vi.spyOn(api, 'agentVms').mockResolvedValue({ items: [] });
    await expect(qc.fetchQuery(agentVmsQuery('a1'))).resolves.toEqual([]);
    expect(vms).toHaveBeenCalledWith('a1', expect.any(AbortSignal));
    const o = commandQuery('c1');
    expect(o.queryKey).toEqual(['command', 'c1']);
    const interval = o.refetchInterval as (q: { state: { data?: { status: string } } }) => number | false;
    expect(interval({ state: { data: { status: 'running' } } })).toBe(POLL_MS);
    expect(interval({ state: {} })).toBe(POLL_MS);
    expect(interval({ state: { data: { status: 'succeeded' } } })).toBe(false);
  });

  it('equal command filters share one entry (empty values dropped)', () => {
    expect(commandsQuery({ status: '', type: '', agentId: '', limit: 100 }).queryKey).toEqual(commandsQuery({ limit: 100 }).queryKey);
  });

  it('every list refreshes on the same interval; the command list only while auto-refresh is on', () => {
    for (const o of [agentsQuery(), templatesQuery(), nodesQuery(), commandsQuery({})]) expect(o.refetchInterval).toBe(POLL_MS);
    expect(commandsQuery({}, false).refetchInterval).toBe(false);
  });

  it('list queries unwrap {items} from the API', async () => {
    const spy = vi.spyOn(api, 'listAgents').mockResolvedValue({ items: [agentA] });
    await expect(qc.fetchQuery(agentsQuery())).resolves.toEqual([agentA]);
    expect(spy).toHaveBeenCalledTimes(1);
    const cmds = vi.spyOn(api, 'listCommands').mockResolvedValue({ items: [] });
    await qc.fetchQuery(commandsQuery({ status: 'running', type: '' }));
    expect(cmds).toHaveBeenCalledWith({ status: 'running' }, expect.any(AbortSignal));
  });

  it('failed requests are not retried (the next poll is the retry)', () => {
    expect(qc.getDefaultOptions().queries?.retry).toBe(false);
  });
});

describe('one shared cache', () => {
  it('two components showing agents cause one request per interval, not one each', async () => {
    vi.useFakeTimers();
    const spy = vi.spyOn(api, 'listAgents').mockResolvedValue({ items: [agentA] });
    const a = new QueryObserver(qc, agentsQuery());
    const b = new QueryObserver(qc, agentsQuery());
    const seen: unknown[] = [];
    const unsubA = a.subscribe((r) => seen.push(r.data));
    await vi.advanceTimersByTimeAsync(400);
    const unsubB = b.subscribe(() => undefined);
    await vi.advanceTimersByTimeAsync(10);
    expect(spy).toHaveBeenCalledTimes(1); // b reads the fresh entry
    expect(b.getCurrentResult().data).toEqual([agentA]);
    await vi.advanceTimersByTimeAsync(POLL_MS * 3);
    expect(spy.mock.calls.length).toBeGreaterThanOrEqual(3);
    expect(spy.mock.calls.length).toBeLessThanOrEqual(4);
    unsubA();
    unsubB();
    // Nobody shows the list: polling stops.
    const n = spy.mock.calls.length;
    await vi.advanceTimersByTimeAsync(POLL_MS * 3);
    expect(spy).toHaveBeenCalledTimes(n);
    expect(seen).toContainEqual([agentA]);
  });

  it('a failed refresh keeps the last good list and reports the error', async () => {
    const spy = vi.spyOn(api, 'listNodes').mockResolvedValueOnce({ items: [node('running')] });
    const obs = new QueryObserver(qc, { ...nodesQuery(), refetchInterval: false });
    const unsub = obs.subscribe(() => undefined);
    await vi.waitFor(() => expect(obs.getCurrentResult().data).toEqual([node('running')]));
    spy.mockRejectedValueOnce(new Error('down'));
    await obs.refetch();
    expect(obs.getCurrentResult()).toMatchObject({ data: [node('running')], error: new Error('down') });
    unsub();
  });
});

describe('mutations invalidate what they change', () => {
  function spyInvalidate() {
    const spy = vi.spyOn(qc, 'invalidateQueries');
    return () => spy.mock.calls.map(([f]) => f?.queryKey);
  }

  it('agents', async () => {
    const keys = spyInvalidate();
    vi.spyOn(api, 'createAgent').mockResolvedValue({ agent: agentA, token: 't', serverPublicKey: 'k' });
    vi.spyOn(api, 'deleteAgent').mockResolvedValue(undefined);
    const m = mutations(qc);
    await expect(m.createAgent('pve-1')).resolves.toEqual({ agent: agentA, token: 't', serverPublicKey: 'k' });
    expect(keys()).toEqual([['agents']]);
    await m.deleteAgent('a1');
    expect(keys()).toEqual([['agents'], ['agents'], ['commands']]);
  });

  it('templates', async () => {
    const keys = spyInvalidate();
    const upd = vi.spyOn(api, 'updateTemplate').mockResolvedValue({} as never);
    vi.spyOn(api, 'deleteTemplate').mockResolvedValue(undefined);
    const m = mutations(qc);
    await m.updateTemplate('t1', {} as never);
    expect(upd).toHaveBeenCalledWith('t1', {});
    await m.deleteTemplate('t1');
    expect(keys()).toEqual([['templates'], ['templates']]);
  });

  it('nodes and provisioning', async () => {
    const keys = spyInvalidate();
    vi.spyOn(api, 'updateNode').mockResolvedValue(node('pending_provision'));
    vi.spyOn(api, 'createNode').mockResolvedValue({ node: node('provisioning'), commandId: 'c1' });
    vi.spyOn(api, 'provisionNode').mockResolvedValue({ node: node('provisioning'), commandId: 'c2' });
    const m = mutations(qc);
    await m.updateNode('n1', { name: 'x' });
    expect(keys()).toEqual([['nodes'], ['node', 'n1']]);
    await m.createNode({ name: 'x', templateId: 't1', provision: { agentId: 'a1' } });
    expect(keys().slice(2)).toEqual([['nodes'], ['commands']]);
    await m.provisionNode('n1', { agentId: 'a1' });
    expect(keys().slice(4)).toEqual([['nodes'], ['node', 'n1'], ['commands']]);
  });

  it('node lifecycle: power, destroy, forget', async () => {
    const keys = spyInvalidate();
    const power = vi.spyOn(api, 'powerNode').mockResolvedValue({ node: node('running'), commandId: 'c5' });
    const destroy = vi.spyOn(api, 'destroyNode').mockResolvedValue({ node: node('destroying'), commandId: 'c6' });
    vi.spyOn(api, 'forgetNode').mockResolvedValue(node('running'));
    const m = mutations(qc);
    await m.powerNode('n1', { action: 'stop' });
    expect(power).toHaveBeenCalledWith('n1', { action: 'stop' });
    expect(keys()).toEqual([['nodes'], ['node', 'n1'], ['commands']]);
    await m.destroyNode('n1', 'web-1');
    expect(destroy).toHaveBeenCalledWith('n1', 'web-1');
    expect(keys().slice(3)).toEqual([['nodes'], ['node', 'n1'], ['commands'], ['agentVms']]);
    await m.forgetNode('n1');
    expect(keys().slice(7)).toEqual([['nodes'], ['node', 'n1'], ['agentVms']]);
  });

  it('lifecycle answers update the cached node list at once', async () => {
    qc.setQueryData(queryKeys.nodes, [node('running'), { id: 'n2', status: 'running' } as VmNode]);
    vi.spyOn(api, 'powerNode').mockResolvedValue({ node: { ...node('running'), lastCommandId: 'c5' }, commandId: 'c5' });
    vi.spyOn(api, 'destroyNode').mockResolvedValue({ node: node('destroying'), commandId: 'c6' });
    vi.spyOn(api, 'forgetNode').mockResolvedValue(node('destroying'));
    const m = mutations(qc);
    await m.powerNode('n1', { action: 'stop' });
    expect(qc.getQueryData<VmNode[]>(queryKeys.nodes)?.[0].lastCommandId).toBe('c5');
    await m.destroyNode('n1', 'web-1');
    expect(qc.getQueryData<VmNode[]>(queryKeys.nodes)?.map((n) => n.status)).toEqual(['destroying', 'running']);
    await m.forgetNode('n1');
    expect(qc.getQueryData<VmNode[]>(queryKeys.nodes)?.map((n) => n.id)).toEqual(['n2']);
  });

  it('commands', async () => {
    const keys = spyInvalidate();
    vi.spyOn(api, 'retryCommand').mockResolvedValue({ commandId: 'c2', status: 'queued', attempt: 2 });
    vi.spyOn(api, 'cancelCommand').mockResolvedValue({} as never);
    vi.spyOn(api, 'createCommand').mockResolvedValue({ commandId: 'c3', status: 'queued' });
    const m = mutations(qc);
    await m.cancelCommand('c1');
    await m.retryCommand('c1');
    await m.createCommand({ agentId: 'a1', type: 'ping', params: {} });
    expect(keys()).toEqual([['commands'], ['command', 'c1'], ['commands'], ['command', 'c1'], ['nodes'], ['commands']]);
  });

  it('a refused change invalidates nothing and rethrows', async () => {
    const keys = spyInvalidate();
    vi.spyOn(api, 'deleteNode').mockRejectedValue(new Error('conflict'));
    await expect(mutations(qc).deleteNode('n1')).rejects.toThrow('conflict');
    expect(keys()).toEqual([]);
  });

  it('an invalidated list that is on screen is fetched again', async () => {
    const list = vi.spyOn(api, 'listTemplates').mockResolvedValue({ items: [] });
    vi.spyOn(api, 'createTemplate').mockResolvedValue({} as never);
    const obs = new QueryObserver(qc, { ...templatesQuery(), refetchInterval: false });
    const unsub = obs.subscribe(() => undefined);
    await vi.waitFor(() => expect(obs.getCurrentResult().status).toBe('success'));
    expect(list).toHaveBeenCalledTimes(1);
    await mutations(qc).createTemplate({} as never);
    await vi.waitFor(() => expect(list).toHaveBeenCalledTimes(2));
    unsub();
  });
});

describe('following a node after its command', () => {
  it('polls every second while provisioning, stops once settled or after the last read', () => {
    const opts = nodeAfterCommandQuery('n1', 'c1', true);
    expect(opts.queryKey).toEqual(['node', 'n1', { after: 'c1' }]);
    const interval = opts.refetchInterval as (q: { state: { data?: VmNode; dataUpdateCount: number } }) => number | false;
    expect(interval({ state: { data: node('provisioning'), dataUpdateCount: 1 } })).toBe(1000);
    expect(interval({ state: { data: node('running'), dataUpdateCount: 2 } })).toBe(false);
    expect(interval({ state: { data: node('provisioning'), dataUpdateCount: NODE_FOLLOW_MAX_READS } })).toBe(false);
    expect(interval({ state: { data: undefined, dataUpdateCount: 0 } })).toBe(false);
    expect(nodeSettled(undefined, 0)).toBe(false);
    expect(nodeSettled(node('provisioning'), 3)).toBe(false);
    expect(nodeSettled(node('failed'), 1)).toBe(true);
    expect(nodeSettled(node('provisioning'), NODE_FOLLOW_MAX_READS)).toBe(true);
  });

  it('is keyed under the node, so invalidating the node refreshes it', async () => {
    vi.spyOn(api, 'getNode').mockResolvedValue(node('running'));
    await qc.fetchQuery(nodeAfterCommandQuery('n1', 'c1', true));
    await qc.invalidateQueries({ queryKey: queryKeys.node('n1') });
    expect(qc.getQueryState(['node', 'n1', { after: 'c1' }])?.isInvalidated).toBe(true);
  });
});
