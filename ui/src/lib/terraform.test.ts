import { describe, expect, it } from 'vitest';
import {
  applyGate,
  groupByAction,
  hasChanges,
  latestByWorkspace,
  planErrorHint,
  planLine,
  planSummary,
  workspaceConfirmed,
} from './terraform';
import { expectedStages, stageLabel } from './stages';
import type { Command } from './types';

// The result shape of protocol/README.md, `terraform_plan`.
const RESULT = {
  add: 2,
  change: 1,
  destroy: 1,
  resources: [
    { address: 'null_resource.web["b"]', action: 'create' },
    { address: 'null_resource.db', action: 'replace' },
    { address: 'null_resource.web["a"]', action: 'create' },
    { address: 'null_resource.cfg', action: 'update' },
    { address: 'data.external.x', action: 'read' },
    { address: 'bogus', action: 'explode' },
  ],
  plan_sha256: '2553e330e70cfb757de7c6ded04dffaa3b59257a947da67c5b6964d2cb994f35',
  resolved_commit: '9fceb02d0ae598e95dc970b74767f19372d61af8',
};

function cmd(over: Partial<Command>): Command {
  return {
    id: 'c1',
    agentId: 'a1',
    type: 'terraform_plan',
    params: {},
    status: 'succeeded',
    attempt: 1,
    rootCommandId: 'c1',
    createdAt: '2026-01-01T00:00:00Z',
    deadlineAt: '2026-01-01T01:00:00Z',
    cancelRequested: false,
    pinned: false,
    lastSeq: 0,
    ...over,
  } as Command;
}

describe('plan summary', () => {
  it('reads the result, dropping resources of an unknown action', () => {
    const s = planSummary(RESULT)!;
    expect([s.add, s.change, s.destroy]).toEqual([2, 1, 1]);
    expect(s.resources.map((r) => r.address)).not.toContain('bogus');
    expect(s.resources).toHaveLength(5);
    expect(s.planSha256).toBe(RESULT.plan_sha256);
    expect(s.resolvedCommit).toBe(RESULT.resolved_commit);
  });
  it('is null for anything that is not a plan result', () => {
    expect(planSummary(null)).toBeNull();
    expect(planSummary({ outputs: {} })).toBeNull();
    expect(planSummary('x')).toBeNull();
  });
  it("says Terraform's Plan line, or No changes", () => {
    expect(planLine(planSummary(RESULT)!)).toBe('Plan: 2 to add, 1 to change, 1 to destroy.');
    const none = planSummary({ add: 0, change: 0, destroy: 0, resources: [] })!;
    expect(hasChanges(none)).toBe(false);
    expect(planLine(none)).toMatch(/^No changes\./);
    // Only data sources to read: nothing changes.
    expect(hasChanges(planSummary({ add: 0, change: 0, destroy: 0, resources: [{ address: 'data.x.y', action: 'read' }] })!)).toBe(false);
  });
  it('groups the changes by action in Terraform order, addresses sorted', () => {
    const g = groupByAction(planSummary(RESULT)!.resources);
    expect(g.map((x) => [x.action, x.symbol, x.resources.map((r) => r.address)])).toEqual([
      ['create', '+', ['null_resource.web["a"]', 'null_resource.web["b"]']],
      ['update', '~', ['null_resource.cfg']],
      ['replace', '-/+', ['null_resource.db']],
      ['read', '<=', ['data.external.x']],
    ]);
    expect(groupByAction([])).toEqual([]);
  });
});

describe('apply gate', () => {
  it('allows only a succeeded plan with changes, once', () => {
    expect(applyGate(cmd({ result: RESULT }))).toEqual({ ok: true });
    expect(applyGate(cmd({ result: RESULT }), true)).toMatchObject({ ok: false, reason: expect.stringMatching(/at most once/) });
    expect(applyGate(cmd({ status: 'running', result: null }))).toMatchObject({ ok: false, reason: expect.stringMatching(/once the plan has succeeded/) });
    expect(applyGate(cmd({ status: 'queued' })).ok).toBe(false);
    expect(applyGate(cmd({ status: 'failed', result: null }))).toMatchObject({ ok: false, reason: expect.stringMatching(/did not succeed/) });
    expect(applyGate(cmd({ status: 'cancelled' })).ok).toBe(false);
    expect(applyGate(cmd({ result: { add: 0, change: 0, destroy: 0, resources: [] } }))).toMatchObject({ ok: false, reason: expect.stringMatching(/no changes/) });
    expect(applyGate(cmd({ type: 'terraform_apply', result: RESULT })).ok).toBe(false);
    expect(applyGate(null).ok).toBe(false);
  });
});

describe('plan errors', () => {
  it('explains the plan codes and leaves others alone', () => {
    expect(planErrorHint('plan_stale')).toMatch(/state changed after this plan was made.*plan again/);
    expect(planErrorHint('plan_missing')).toMatch(/at most once/);
    expect(planErrorHint('plan_hash_mismatch')).toMatch(/SHA-256/);
    expect(planErrorHint('plan_invalid')).toMatch(/succeeded plan/);
    expect(planErrorHint('terraform_failed')).toBeNull();
    expect(planErrorHint(null)).toBeNull();
  });
});

describe('workspaces', () => {
  it("finds each workspace's newest command in a newest-first list", () => {
    const list = [
      cmd({ id: 'new-a', target: { workspace: 'a' } }),
      cmd({ id: 'new-b', target: { workspace: '/srv/r#' } }),
      cmd({ id: 'old-a', target: { workspace: 'a' } }),
      cmd({ id: 'none' }),
    ];
    const m = latestByWorkspace(list);
    expect([...m.entries()].map(([k, v]) => [k, v.id])).toEqual([
      ['a', 'new-a'],
      ['/srv/r#', 'new-b'],
    ]);
  });
  it('confirms a destroy only with the exact workspace name', () => {
    expect(workspaceConfirmed(' /srv/r# ', '/srv/r#')).toBe(true);
    expect(workspaceConfirmed('/srv/r', '/srv/r#')).toBe(false);
    expect(workspaceConfirmed('', 'web')).toBe(false);
  });
});

describe('terraform stages', () => {
  it('lists the stages of plan and destroy', () => {
    expect(expectedStages('terraform_plan')).toEqual(['fetch_template', 'init', 'plan', 'show']);
    expect(expectedStages('terraform_destroy')).toEqual(['fetch_template', 'init', 'destroy']);
    expect(stageLabel('plan')).toBe('terraform plan');
    expect(stageLabel('destroy')).toBe('terraform destroy');
  });
});
