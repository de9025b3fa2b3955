import { describe, expect, it, vi } from 'vitest';
import { countOf, describeResults, expandNames, gridRow, nodeProgressText, nodesMatching, perNodeValues, previewNames, selectedShown, summarize, takenNames, validateCount, withPerNode } from './bulk';
import { perNodeOf } from '../pages/provision/BulkNaming';
import { EMPTY_CLONE } from '../pages/provision/cloneOptions';
import type { Agent, Template, VmNode } from './types';
import { derive, initProvisionState, provisionReducer, type Catalog, type ProvisionAction, type ProvisionState } from '../pages/provision/provisionReducer';
import { submitBatch } from '../pages/provision/bulkSubmit';

const node = (over: Partial<VmNode> = {}): VmNode => ({
  id: 'n1',
  application: null,
  name: 'web-1',
  templateId: 't1',
  memory: 1024,
  cores: 1,
  vmId: null,
  hypervisorId: null,
  ipAddress: null,
  status: 'provisioning',
  lastCommandId: 'c1',
  error: null,
  createdAt: '',
  updatedAt: '',
  ...over,
});

const progress = (over: Partial<NonNullable<VmNode['progress']>> = {}): VmNode['progress'] => ({
  commandType: 'provision',
  commandStatus: 'running',
  stage: 'configure_vm',
  percent: 40,
  attempt: 1,
  ...over,
});

describe('name pattern', () => {
  it('counts from 1 and skips taken names, ignoring case, like the server', () => {
    expect(expandNames('web-{n}', 3, ['WEB-1', 'web-3']).names).toEqual(['web-2', 'web-4', 'web-5']);
    expect(expandNames('{n}.db.lab', 2).names).toEqual(['1.db.lab', '2.db.lab']);
    expect(expandNames('web-{n}', 50).names).toHaveLength(50);
  });

  it('needs {n} for more than one node, once', () => {
    expect(expandNames('web', 2).error).toMatch(/\{n\}/);
    expect(expandNames('web-{n}-{n}', 2).error).toMatch(/only once/);
    expect(expandNames('web', 1)).toEqual({ names: ['web'], error: null });
    expect(expandNames('web', 1, ['Web']).error).toMatch(/already exists/);
  });

  it('checks every name made', () => {
    expect(expandNames('web_{n}', 2).error).toMatch(/letters, digits and hyphens/);
    const long = `${'a'.repeat(62)}{n}`;
    expect(expandNames(long, 9).error).toBeNull();
    expect(expandNames(long, 10).error).toMatch(/63/);
  });

  it('validates the count and previews long lists', () => {
    expect(validateCount('1')).toBeNull();
    expect(validateCount('50')).toBeNull();
    for (const bad of ['0', '51', '', '2.5', '-1', 'x']) expect(validateCount(bad)).not.toBeNull();
    expect(countOf('7')).toBe(7);
    expect(countOf('99')).toBe(1);
    expect(previewNames(['a', 'b', 'c'])).toBe('a, b, c');
    expect(previewNames(expandNames('w-{n}', 20).names, 4)).toBe('w-1, w-2, w-3, …, w-20');
  });
});

describe('progress grid', () => {
  it('turns each node into a row', () => {
    expect(gridRow(node({ progress: progress() }))).toMatchObject({ state: 'active', label: 'Configure VM', percent: 40 });
    expect(gridRow(node({ progress: progress({ commandStatus: 'queued', stage: null, percent: null }) }))).toMatchObject({
      state: 'waiting',
      label: 'Waiting for a slot',
      percent: 0,
    });
    expect(gridRow(node({ status: 'running', vmId: 101, ipAddress: '10.0.0.5' }))).toMatchObject({
      state: 'done',
      percent: 100,
      vmId: 101,
      ip: '10.0.0.5',
      error: null,
    });
    const failed = gridRow(node({ status: 'failed', error: 'clone_failed: storage full' }));
    expect(failed).toMatchObject({ state: 'failed', error: 'clone_failed: storage full' });
    expect(gridRow(node({ progress: progress({ attempt: 2 }) })).attempt).toBe(2);
  });

  it('summarizes: settled only when no command runs; failed ids for Retry failed', () => {
    const rows = [
      gridRow(node({ id: 'a', status: 'running' })),
      gridRow(node({ id: 'b', status: 'failed', error: 'x' })),
      gridRow(node({ id: 'c', progress: progress() })),
      gridRow(node({ id: 'd', progress: progress({ commandStatus: 'queued' }) })),
    ];
    const s = summarize(rows);
    expect(s).toMatchObject({ total: 4, done: 1, failed: 1, active: 1, waiting: 1, settled: false, failedIds: ['b'] });
    expect(summarize(rows.slice(0, 2)).settled).toBe(true);
  });

  it('says what a node is doing in the Nodes table', () => {
    expect(nodeProgressText(node({ progress: progress() }))).toBe('Configure VM 40%');
    expect(nodeProgressText(node({ progress: progress({ commandStatus: 'queued' }) }))).toBe('queued');
    expect(nodeProgressText(node({ progress: null }))).toBeNull();
  });

  it('describes per-node results', () => {
    const text = describeResults({
      succeeded: 1,
      failed: 1,
      results: [
        { nodeId: 'a', name: 'web-1', commandId: 'c', error: null },
        { nodeId: 'b', name: null, commandId: null, error: { code: 'not_found', message: 'node "b" not found' } },
      ],
    });
    expect(text).toBe('1 started, 1 refused: b (not_found: node "b" not found)');
  });
});

describe('bulk in the wizard', () => {
  const agent = { id: 'a1', name: 'pve-1', status: 'online', capabilities: ['provision'] } as unknown as Agent;
  const template = { id: 't1', name: 'debian', memory: 1024, cores: 1, proxmoxTemplateId: 9000 } as unknown as Template;
  const catalog: Catalog = { agents: [agent], templates: [template] };
  const at = (count: string, name: string): ProvisionState => {
    const actions: ProvisionAction[] = [
      { type: 'selectAgent', agentId: 'a1' },
      { type: 'selectTemplate', templateId: 't1' },
      { type: 'setConfig', config: { name, memory: '1024', cores: '1', application: '' } },
      { type: 'setCount', count },
    ];
    return actions.reduce(provisionReducer, initProvisionState(null));
  };

  it('a count above 1 makes the name a pattern', () => {
    expect(derive(at('1', 'web'), catalog)).toMatchObject({ bulk: false, configValid: true });
    expect(derive(at('3', 'web-{n}'), catalog)).toMatchObject({ bulk: true, configValid: true });
    const noN = derive(at('3', 'web'), catalog);
    expect(noN.configValid).toBe(false);
    expect(noN.configErrors.name).toMatch(/\{n\}/);
    expect(derive(at('51', 'web-{n}'), catalog)).toMatchObject({ configValid: false, countError: expect.stringMatching(/50/) });
  });

  it('submits one bulk request and follows the batch', async () => {
    const send = vi.fn().mockResolvedValue({ batchId: 'b1', nodes: [] });
    let s = at('3', 'web-{n}');
    await submitBatch(s, catalog, (a) => (s = provisionReducer(s, a)), send);
    expect(send).toHaveBeenCalledWith(
      expect.objectContaining({ count: 3, namePattern: 'web-{n}', templateId: 't1', memory: 1024, cores: 1, provision: expect.objectContaining({ agentId: 'a1' }) }),
    );
    expect(s).toMatchObject({ step: 'provisioning', batchId: 'b1', submitting: false });
  });

  it('shows the refusal and stays on review', async () => {
    const send = vi.fn().mockRejectedValue(new Error('name taken'));
    let s = at('2', 'web-{n}');
    await submitBatch(s, catalog, (a) => (s = provisionReducer(s, a)), send);
    expect(s).toMatchObject({ submitting: false, submitError: 'name taken', batchId: null });
  });
});

describe('the bulk name preview follows the server’s name rule', () => {
  it('does not count destroyed nodes, and ignores case', () => {
    const nodes = [
      node({ name: 'web-1', status: 'destroyed' }),
      node({ name: 'WEB-2', status: 'running' }),
      node({ name: 'web-3', status: 'failed' }),
      node({ name: 'web-4', status: 'missing' }),
    ];
    expect(takenNames(nodes)).toEqual(['WEB-2', 'web-3', 'web-4']);
    // web-1's record is history: its name is free again, as the server counts it.
    expect(expandNames('web-{n}', 3, takenNames(nodes)).names).toEqual(['web-1', 'web-5', 'web-6']);
    expect(expandNames('Web-2', 1, takenNames(nodes)).error).toMatch(/already exists/);
    expect(expandNames('web-1', 1, takenNames(nodes))).toEqual({ names: ['web-1'], error: null });
  });
});

describe('per-node VMID and static address of a bulk provision', () => {
  it('counts up from the start values, gateway unchanged', () => {
    const per = perNodeValues(3, '500', '10.0.0.10/24', '10.0.0.1');
    expect(per).toEqual({ vmIds: [500, 501, 502], addresses: ['10.0.0.10/24', '10.0.0.11/24', '10.0.0.12/24'], error: null });
    expect(withPerNode(['web-1', 'web-2', 'web-3'], per)).toEqual([
      'web-1 (VMID 500, 10.0.0.10/24)',
      'web-2 (VMID 501, 10.0.0.11/24)',
      'web-3 (VMID 502, 10.0.0.12/24)',
    ]);
    // across an octet inside a /16
    expect(perNodeValues(2, '', '10.1.0.255/16', null).addresses).toEqual(['10.1.0.255/16', '10.1.1.0/16']);
    // nothing set: names alone
    expect(withPerNode(['a', 'b'], perNodeValues(2, '', null, null))).toEqual(['a', 'b']);
  });

  it('refuses a range the server refuses', () => {
    expect(perNodeValues(2, '999999999', null, null).error).toMatch(/highest VMID/);
    expect(perNodeValues(2, '999999998', null, null).error).toBeNull();
    expect(perNodeValues(5, '', '10.0.0.250/24', null).error).toBeNull();
    expect(perNodeValues(6, '', '10.0.0.250/24', null).error).toMatch(/broadcast address of 10.0.0.0\/24/);
    expect(perNodeValues(7, '', '10.0.0.250/24', null).error).toMatch(/Node 6 would get 10.0.0.255, the broadcast/);
    expect(perNodeValues(3, '', '10.0.0.10/24', '10.0.0.12').error).toMatch(/gateway/);
    expect(perNodeValues(2, '', '10.0.0.10/32', null).error).toMatch(/outside 10.0.0.10\/32/);
    expect(perNodeValues(2, '', '10.0.0.10/31', null).addresses).toEqual(['10.0.0.10/31', '10.0.0.11/31']);
  });

  it('applies to the Configure step’s options only in bulk and for a static address', () => {
    const clone = { ...EMPTY_CLONE, vmId: '700', ipMode: 'dhcp' as const, ipAddress: '10.0.0.5/24' };
    expect(perNodeOf(1, clone)).toBeNull();
    expect(perNodeOf(2, clone)).toEqual({ vmIds: [700, 701], addresses: null, error: null });
    expect(perNodeOf(2, { ...clone, ipMode: 'static' })?.addresses).toEqual(['10.0.0.5/24', '10.0.0.6/24']);
  });
});

describe('bulk actions and the filter', () => {
  it('act only on the selected nodes the filter shows', () => {
    const items = [node({ id: 'a', name: 'web-1' }), node({ id: 'b', name: 'web-2' }), node({ id: 'c', name: 'db-1' })];
    const selected = new Set(['a', 'c']);
    expect(selectedShown(nodesMatching(items, ''), selected).map((n) => n.id)).toEqual(['a', 'c']);
    // db-1 stays selected but hidden by the filter: not acted on
    expect(selectedShown(nodesMatching(items, 'web'), selected).map((n) => n.id)).toEqual(['a']);
    expect(selectedShown(nodesMatching(items, 'nothing'), selected)).toEqual([]);
  });

  it('filter by name, status label and VM id', () => {
    const items = [node({ id: 'a', name: 'web-1', vmId: 4242 }), node({ id: 'b', name: 'api-1', status: 'stopped' })];
    expect(nodesMatching(items, ' 4242 ').map((n) => n.id)).toEqual(['a']);
    expect(nodesMatching(items, 'STOPPED').map((n) => n.id)).toEqual(['b']);
  });
});
