import { describe, expect, it } from 'vitest';
import { applyEvent, commandPercent, expectedStages, failedStage, mergeSnapshot, mergeStages, provisionOutcome, stageLabel } from './stages';
import { commandError, type Command, type Stage } from './types';

const base: Command = {
  id: 'c1',
  agentId: 'a1',
  type: 'provision',
  params: {},
  status: 'dispatched',
  stage: null,
  percent: null,
  result: null,
  error: null,
  attempt: 1,
  rootCommandId: 'c1',
  retryOf: null,
  idempotencyKey: null,
  createdBy: 'admin',
  createdAt: '2026-11-25T09:00:00Z',
  dispatchedAt: null,
  startedAt: null,
  finishedAt: null,
  deadlineAt: '2026-11-25T10:00:00Z',
  cancelRequested: false,
  pinned: false,
  lastSeq: 0,
};

const st = (name: string, state: Stage['state']): Stage => ({ name, state, startedAt: null, finishedAt: null, message: null });

describe('mergeStages', () => {
  it('lists all provision stages in order, pending when unreported', () => {
    const s = mergeStages('provision', [st('configure_vm', 'running'), st('clone_template', 'completed')]);
    expect(s.map((x) => [x.name, x.state])).toEqual([
      ['clone_template', 'completed'],
      ['configure_vm', 'running'],
      ['start_vm', 'pending'],
      ['wait_network', 'pending'],
      ['post_provision', 'pending'],
      ['register', 'pending'],
    ]);
  });

  it('appends unknown stages and handles types without stages', () => {
    expect(mergeStages('terraform_apply', [st('extra', 'completed')]).map((s) => s.name)).toEqual(['fetch_template', 'init', 'apply', 'outputs', 'extra']);
    expect(mergeStages('ping', undefined)).toEqual([]);
  });
});

describe('applyEvent', () => {
  it('starts and completes stages and marks the command running', () => {
    let c = applyEvent(base, 'stage', { seq: 1, ts: '2026-11-25T09:00:01Z', stage: 'clone_template', state: 'running', percent: 5 });
    expect(c.status).toBe('running');
    expect(c.stage).toBe('clone_template');
    expect(c.percent).toBe(5);
    expect(c.stages?.[0]).toMatchObject({ state: 'running', startedAt: '2026-11-25T09:00:01Z', finishedAt: null });
    c = applyEvent(c, 'stage', { seq: 2, ts: '2026-11-25T09:00:04Z', stage: 'clone_template', state: 'completed', message: 'cloned' });
    expect(c.stages?.[0]).toMatchObject({ state: 'completed', startedAt: '2026-11-25T09:00:01Z', finishedAt: '2026-11-25T09:00:04Z', message: 'cloned' });
  });

  it('applies progress and finished events', () => {
    let c = applyEvent(base, 'progress', { seq: 1, percent: 42 });
    expect(c.percent).toBe(42);
    c = applyEvent(c, 'stage', { seq: 2, stage: 'start_vm', state: 'running' });
    c = applyEvent(c, 'finished', {
      seq: 3,
      ts: '2026-11-25T09:01:00Z',
      status: 'failed',
      error: { code: 'proxmox_error', message: 'boom', retryable: true, stage: 'start_vm' },
    });
    expect(c.status).toBe('failed');
    expect(commandError(c)?.code).toBe('proxmox_error');
    expect(c.stages?.find((s) => s.name === 'start_vm')?.state).toBe('failed');
    expect(c.finishedAt).toBe('2026-11-25T09:01:00Z');
    const ok = applyEvent(base, 'finished', { seq: 9, status: 'succeeded', result: { vm_id: 101 } });
    expect(ok.percent).toBe(100);
    expect(ok.result).toEqual({ vm_id: 101 });
  });

  it('does not turn a terminal command back to running', () => {
    const c = applyEvent({ ...base, status: 'cancelled' }, 'stage', { seq: 5, stage: 'register', state: 'running' });
    expect(c.status).toBe('cancelled');
  });
});

describe('mergeSnapshot', () => {
  it('does not move stages or status backwards for a snapshot older than applied events', () => {
    let live = applyEvent({ ...base, lastSeq: 0 }, 'stage', { seq: 4, stage: 'clone_template', state: 'completed' });
    live = applyEvent(live, 'stage', { seq: 5, stage: 'configure_vm', state: 'running' });
    expect(live.lastSeq).toBe(5);
    const old = { ...base, status: 'running' as const, lastSeq: 3, stages: [st('clone_template', 'running')] };
    const merged = mergeSnapshot(live, old);
    expect(merged.stages?.find((x) => x.name === 'clone_template')?.state).toBe('completed');
    expect(merged.stages?.find((x) => x.name === 'configure_vm')?.state).toBe('running');
    expect(merged.lastSeq).toBe(5);
    const done = applyEvent(live, 'finished', { seq: 9, status: 'succeeded', result: { vm_id: 1 } });
    expect(mergeSnapshot(done, { ...old, lastSeq: 6 }).status).toBe('succeeded');
    // A newer snapshot wins.
    const fresh = mergeSnapshot(live, { ...base, status: 'failed', lastSeq: 12, stages: [st('clone_template', 'failed')] });
    expect(fresh.status).toBe('failed');
    expect(fresh.stages?.[0].state).toBe('failed');
  });

  it('keeps stages when the snapshot has none', () => {
    const prev = { ...base, stages: [st('clone_template', 'completed')] };
    const next = mergeSnapshot(prev, { ...base, status: 'running' });
    expect(next.status).toBe('running');
    expect(next.stages).toBe(prev.stages);
    expect(mergeSnapshot(prev, { ...base, id: 'other' }).stages).toBeUndefined();
  });
});

describe('commandPercent', () => {
  it('uses the reported percent, clamped', () => {
    expect(commandPercent({ ...base, percent: 37.5 })).toBe(37.5);
    expect(commandPercent({ ...base, percent: 140 })).toBe(100);
  });
  it('derives from stages when no percent (running counts half)', () => {
    const stages = [st('clone_template', 'completed'), st('configure_vm', 'completed'), st('start_vm', 'running')];
    expect(commandPercent({ ...base, stages })).toBe(42); // 2.5 of 6
  });
  it('never shows less than the stages say', () => {
    const stages = [st('clone_template', 'completed'), st('configure_vm', 'running')];
    expect(commandPercent({ ...base, percent: 0, stages })).toBe(25); // 1.5 of 6
    expect(commandPercent({ ...base, percent: 60, stages })).toBe(60);
  });
  it('is 100 when succeeded and 0 with nothing known', () => {
    expect(commandPercent({ ...base, status: 'succeeded' })).toBe(100);
    expect(commandPercent({ ...base, type: 'ping' })).toBe(0);
  });
});

describe('failedStage / provisionOutcome / labels', () => {
  it('finds the failed stage', () => {
    expect(failedStage({ error: { code: 'x', message: '', retryable: false, stage: 'wait_network' }, stages: [], stage: null })).toBe('wait_network');
    expect(failedStage({ error: null, stages: [st('clone_template', 'failed')], stage: 'x' })).toBe('clone_template');
    expect(failedStage({ error: null, stages: [], stage: 'start_vm' })).toBe('start_vm');
  });
  it('reads vm id and ip in either case', () => {
    expect(provisionOutcome({ vm_id: 104, ip_address: '10.0.0.5', node: 'pve1' })).toEqual({ vmId: 104, ip: '10.0.0.5', node: 'pve1' });
    expect(provisionOutcome({ vmId: 7, ipAddress: '10.1.1.1' })).toMatchObject({ vmId: 7, ip: '10.1.1.1' });
    expect(provisionOutcome(null)).toEqual({ vmId: null, ip: null, node: null });
  });
  it('labels stages', () => {
    expect(stageLabel('wait_network')).toBe('Wait for network');
    expect(stageLabel('some_new_stage')).toBe('Some new stage');
    expect(stageLabel('delete_vm')).toBe('Delete VM and disks');
    expect(stageLabel('wait_state')).toBe('Wait for the new state');
    expect(expectedStages('vm_power')).toEqual(['request', 'wait_state']);
    expect(expectedStages('destroy')).toEqual(['check_tag', 'stop_vm', 'delete_vm', 'confirm_gone']);
  });
});
