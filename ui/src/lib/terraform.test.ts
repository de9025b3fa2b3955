import { describe, expect, it } from 'vitest';
import {
  applyGate,
  destroyAgent,
  destroyGate,
  groupByAction,
  hasChanges,
  isDestroyPlan,
  latestByWorkspace,
  planAgain,
  planErrorHint,
  planLine,
  planSummary,
  workspaceConfirmed,
} from './terraform';
import { expectedStages, stageLabel } from './stages';
import type { Agent, Command } from './types';

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

// A destroy plan's result: every resource of the state under delete, mode destroy.
const DESTROY_RESULT = {
  add: 0,
  change: 0,
  destroy: 2,
  resources: [
    { address: 'null_resource.web["b"]', action: 'delete' },
    { address: 'null_resource.web["a"]', action: 'delete' },
  ],
  plan_sha256: 'ab'.repeat(32),
  mode: 'destroy',
};

describe('destroy plans', () => {
  const destroyPlan = (over: Partial<Command> = {}) => cmd({ params: { destroy: true }, result: DESTROY_RESULT, target: { workspace: '/srv/r#web' }, ...over });

  it('are told apart by their params, and their result by its mode', () => {
    expect(isDestroyPlan(destroyPlan())).toBe(true);
    expect(isDestroyPlan(destroyPlan({ status: 'running', result: null }))).toBe(true);
    expect(isDestroyPlan(cmd({ result: RESULT }))).toBe(false);
    expect(isDestroyPlan(cmd({ params: { destroy: 'yes' } }))).toBe(false);
    // The apply of a destroy plan carries destroy too, but it is not a plan.
    expect(isDestroyPlan(cmd({ type: 'terraform_apply', params: { destroy: true } }))).toBe(false);
    expect(isDestroyPlan(null)).toBe(false);
    expect(planSummary(DESTROY_RESULT)!.mode).toBe('destroy');
    expect(planSummary(RESULT)!.mode).toBe('normal');
  });
  it('list every resource under Destroy, with Terraform’s line', () => {
    const s = planSummary(DESTROY_RESULT)!;
    expect(planLine(s)).toBe('Plan: 0 to add, 0 to change, 2 to destroy.');
    expect(groupByAction(s.resources).map((g) => [g.title, g.symbol, g.resources.map((r) => r.address)])).toEqual([
      ['Destroy', '-', ['null_resource.web["a"]', 'null_resource.web["b"]']],
    ]);
    const empty = planSummary({ ...DESTROY_RESULT, destroy: 0, resources: [] })!;
    expect(planLine(empty)).toBe('No changes. No objects need to be destroyed.');
  });
  it('are approved only once succeeded, with something to destroy, and the workspace name typed', () => {
    expect(applyGate(destroyPlan())).toEqual({ ok: true });
    expect(destroyGate(destroyPlan(), '')).toMatchObject({ ok: false, reason: expect.stringMatching(/Type the workspace name/) });
    expect(destroyGate(destroyPlan(), '/srv/r')).toMatchObject({ ok: false });
    expect(destroyGate(destroyPlan(), ' /srv/r#web ')).toEqual({ ok: true });
    // The plan's own gates come first, whatever is typed.
    expect(destroyGate(destroyPlan({ status: 'running', result: null }), '/srv/r#web')).toMatchObject({ ok: false, reason: expect.stringMatching(/Approve is possible once the destroy plan has succeeded/) });
    expect(destroyGate(destroyPlan(), '/srv/r#web', true)).toMatchObject({ ok: false, reason: expect.stringMatching(/at most once/) });
    expect(destroyGate(destroyPlan({ result: { ...DESTROY_RESULT, destroy: 0, resources: [] } }), '/srv/r#web')).toMatchObject({ ok: false, reason: expect.stringMatching(/Nothing to destroy/) });
    expect(destroyGate(destroyPlan({ target: null }), '/srv/r#web')).toMatchObject({ ok: false, reason: expect.stringMatching(/names no workspace/) });
  });
  it('are not approved as a destroy when the agent made a normal plan, nor the reverse', () => {
    // An agent that predates destroy plans ignores `destroy`: its result has no mode.
    const old = destroyPlan({ result: { ...RESULT } });
    expect(applyGate(old)).toMatchObject({ ok: false, reason: expect.stringMatching(/made a normal plan/) });
    expect(destroyGate(old, '/srv/r#web').ok).toBe(false);
    expect(applyGate(cmd({ result: DESTROY_RESULT }))).toMatchObject({ ok: false, reason: expect.stringMatching(/not asked for/) });
  });
  it('run on the source’s agent if it can plan, else an online one that can', () => {
    const a = (id: string, status: string, caps: string[]) => ({ id, status, capabilities: caps }) as unknown as Agent;
    const agents = [a('off', 'offline', ['terraform_plan']), a('noplan', 'online', ['ping']), a('on', 'online', ['terraform_plan']), a('src', 'offline', ['terraform_plan'])];
    expect(destroyAgent('src', agents)).toBe('src');
    expect(destroyAgent('noplan', agents)).toBe('on');
    expect(destroyAgent(null, agents)).toBe('on');
    expect(destroyAgent('x', [agents[0]])).toBe('off');
    expect(destroyAgent('x', [agents[1]])).toBeNull();
  });
  it('are started from an earlier command with destroy; planning again does not copy it', async () => {
    const sent: unknown[] = [];
    const m = { createCommand: async (b: unknown) => (sent.push(b), { commandId: 'new', status: 'queued' }) } as unknown as Parameters<typeof planAgain>[0];
    expect(await planAgain(m, { id: 'apply1', agentId: 'a1' }, 'a2', true)).toBe('new');
    expect(await planAgain(m, { id: 'apply1', agentId: 'a1' })).toBe('new');
    expect(sent).toEqual([
      { agentId: 'a2', type: 'terraform_plan', params: { source_command_id: 'apply1', destroy: true, meta: { triggered_by: 'trellis-ui', reason: 'destroy from the Deploy page' } } },
      { agentId: 'a1', type: 'terraform_plan', params: { source_command_id: 'apply1', meta: { triggered_by: 'trellis-ui', reason: 'plan again' } } },
    ]);
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
