import { describe, expect, it } from 'vitest';
import { cancelledSentence, startedAt, targetLabel, vmCleanupSentence } from './commandText';
import type { Command } from './types';

const cmd = (over: Partial<Command>): Command =>
  ({
    id: 'c1',
    agentId: 'a1',
    type: 'provision',
    params: {},
    status: 'failed',
    attempt: 1,
    rootCommandId: 'c1',
    createdBy: 'admin',
    createdAt: '2026-01-01T00:00:00Z',
    deadlineAt: '2026-01-01T01:00:00Z',
    cancelRequested: false,
    lastSeq: 0,
    ...over,
  }) as Command;

describe('vmCleanupSentence', () => {
  it('says the half-built VM was removed', () => {
    const c = cmd({ error: { code: 'proxmox_error', message: 'disk full', details: { vm_id: 123, node: 'pve1', status: 'cleaned_up' } } });
    expect(vmCleanupSentence(c)).toEqual({ text: 'The partly built VM 123 on pve1 was removed.', tone: 'info' });
  });
  it('says it was kept with keep on failure, or left when removing it failed', () => {
    const kept = cmd({ error: { code: 'x', message: 'y', details: { vm_id: 124, node: 'pve1', status: 'partial', stages_completed: [] } } });
    expect(vmCleanupSentence(kept)?.text).toBe('The partly built VM 124 on pve1 was kept for inspection (keep on failure).');
    const left = cmd({ error: { code: 'x', message: 'y', details: { vm_id: 125, node: 'pve1', status: 'partial', cleanup_error: 'locked' } } });
    expect(vmCleanupSentence(left)).toEqual({ text: 'The partly built VM 125 on pve1 could not be removed (locked); it is still there.', tone: 'warn' });
  });
  it('says nothing without a VM, for other types, or on success', () => {
    expect(vmCleanupSentence(cmd({ error: { code: 'x', message: 'clone failed' } }))).toBeNull();
    expect(vmCleanupSentence(cmd({ type: 'ping', error: { code: 'x', message: 'y', details: { vm_id: 1, status: 'cleaned_up' } } }))).toBeNull();
    expect(vmCleanupSentence(cmd({ status: 'succeeded' }))).toBeNull();
  });
  it('also covers a cancelled provision', () => {
    const c = cmd({ status: 'cancelled', error: { code: 'cancelled', message: 'cancelled by request: cancelled', details: { vm_id: 130, node: 'pve2', status: 'cleaned_up' } } });
    expect(vmCleanupSentence(c)?.text).toBe('The partly built VM 130 on pve2 was removed.');
  });
});

describe('cancelledSentence', () => {
  it('is one sentence naming the stage, not the raw code and message', () => {
    const c = cmd({ status: 'cancelled', startedAt: '2026-01-01T00:00:01Z', error: { code: 'cancelled', message: 'cancelled by request: cancelled', stage: 'clone_template' } });
    expect(cancelledSentence(c)).toBe('Cancelled on request during “Clone template”.');
    expect(cancelledSentence(cmd({ status: 'cancelled', startedAt: null }))).toBe('Cancelled on request before it started; nothing was done.');
    expect(cancelledSentence(cmd({ status: 'failed' }))).toBeNull();
  });
});

describe('startedAt', () => {
  it('falls back to the earliest stage start', () => {
    expect(startedAt(cmd({ startedAt: '2026-01-01T00:00:05Z' }))).toBe('2026-01-01T00:00:05Z');
    const stages = [
      { name: 'configure_vm', state: 'running', startedAt: '2026-01-01T00:00:09Z', finishedAt: null, message: null },
      { name: 'clone_template', state: 'completed', startedAt: '2026-01-01T00:00:02Z', finishedAt: null, message: null },
    ];
    expect(startedAt(cmd({ startedAt: null, stages }))).toBe('2026-01-01T00:00:02Z');
    expect(startedAt(cmd({ startedAt: null }))).toBeNull();
  });
});

describe('targetLabel', () => {
  it('names the node, else the workspace, else the VM', () => {
    expect(targetLabel(cmd({ target: { nodeId: 'n1', nodeName: 'web-1', vmId: 101 } }))).toBe('web-1');
    expect(targetLabel(cmd({ target: { workspace: 'repo@v1' } }))).toBe('repo@v1');
    expect(targetLabel(cmd({ target: { vmId: 101, proxmoxNode: 'pve' } }))).toBe('VM 101 on pve');
    expect(targetLabel(cmd({ target: { nodeId: 'n1', nodeName: null } }))).toBe('deleted node');
    expect(targetLabel(cmd({}))).toBeNull();
  });
});

describe('mergeSnapshot keeps what is known ("Started –" while startedAt was set)', () => {
  it('an older snapshot with the same lastSeq does not erase startedAt or move the status back', async () => {
    const { mergeSnapshot, applyEvent } = await import('./stages');
    const running = cmd({ status: 'running', dispatchedAt: '2026-01-01T00:00:01Z', startedAt: '2026-01-01T00:00:02Z', lastSeq: 0 });
    // The SSE stream's first status (taken while dispatched) lands after GET answered.
    const late = cmd({ status: 'dispatched', dispatchedAt: '2026-01-01T00:00:01Z', startedAt: null, lastSeq: 0 });
    const m = mergeSnapshot(running, late);
    expect(m.startedAt).toBe('2026-01-01T00:00:02Z');
    expect(m.status).toBe('running');
    // A stale one (lower lastSeq) neither.
    const s = mergeSnapshot({ ...running, lastSeq: 5 }, { ...late, lastSeq: 2 });
    expect(s.startedAt).toBe('2026-01-01T00:00:02Z');
    // A newer snapshot still moves forward.
    expect(mergeSnapshot(running, cmd({ status: 'failed', startedAt: '2026-01-01T00:00:02Z', lastSeq: 3 })).status).toBe('failed');
    // A live stage event marks the command started when no snapshot said so yet.
    const ev = applyEvent(late, 'stage', { seq: 1, ts: '2026-01-01T00:00:03Z', stage: 'clone_template', state: 'running' });
    expect(ev.startedAt).toBe('2026-01-01T00:00:03Z');
    expect(ev.status).toBe('running');
  });
});
