// Terraform on the Deploy page: reading a `terraform_plan`'s result (the resource changes by
// action), whether its plan may be applied (a destroy plan only once the workspace name is
// typed), the sentences for the plan errors the agent and the control plane report, each
// workspace's last apply out of a command list, and starting plans and destroy plans from an
// earlier command. Pure functions (and two thin starters), tested in terraform.test.ts.
import type { Mutations } from './queries';
import type { Agent, Command } from './types';
import { commandError, isTerminal } from './types';

/** A resource change as `terraform_plan` reports it (protocol/README.md, `terraform_plan`). */
export type PlanAction = 'create' | 'update' | 'replace' | 'delete' | 'read';

export interface PlanResource {
  address: string;
  action: PlanAction;
}

/** A succeeded `terraform_plan`'s result. */
export interface PlanSummary {
  add: number;
  change: number;
  destroy: number;
  resources: PlanResource[];
  planSha256: string | null;
  resolvedCommit: string | null;
  /** `destroy` for a destroy plan (`terraform plan -destroy`): applying it deletes what it lists. */
  mode: 'normal' | 'destroy';
}

const ACTIONS: readonly PlanAction[] = ['create', 'update', 'replace', 'delete', 'read'];

function isAction(a: unknown): a is PlanAction {
  return typeof a === 'string' && (ACTIONS as readonly string[]).includes(a);
}

const count = (v: unknown) => (typeof v === 'number' && Number.isFinite(v) && v >= 0 ? v : 0);

/** The summary in a plan's result, or null when the result is not one (not finished, another type). */
export function planSummary(result: unknown): PlanSummary | null {
  if (!result || typeof result !== 'object') return null;
  const r = result as Record<string, unknown>;
  if (!Array.isArray(r.resources) || typeof r.add !== 'number') return null;
  const resources: PlanResource[] = [];
  for (const x of r.resources) {
    if (!x || typeof x !== 'object') continue;
    const { address, action } = x as Record<string, unknown>;
    if (typeof address === 'string' && isAction(action)) resources.push({ address, action });
  }
  return {
    add: count(r.add),
    change: count(r.change),
    destroy: count(r.destroy),
    resources,
    planSha256: typeof r.plan_sha256 === 'string' ? r.plan_sha256 : null,
    resolvedCommit: typeof r.resolved_commit === 'string' ? r.resolved_commit : null,
    // Agents that predate destroy plans leave it out: their plans are normal ones.
    mode: r.mode === 'destroy' ? 'destroy' : 'normal',
  };
}

/**
 * Whether a command is a plan asked as a destroy plan (`params.destroy`), known from the
 * moment it is created, so its page says so while it runs.
 */
export function isDestroyPlan(cmd: Pick<Command, 'type' | 'params'> | null | undefined): boolean {
  if (!cmd || cmd.type !== 'terraform_plan') return false;
  const p = cmd.params as Record<string, unknown> | null | undefined;
  return !!p && typeof p === 'object' && p.destroy === true;
}

/** Whether the plan changes anything (a plan of only data-source reads changes nothing). */
export function hasChanges(s: PlanSummary): boolean {
  return s.add + s.change + s.destroy > 0 || s.resources.some((r) => r.action !== 'read');
}

/** Terraform's own "Plan: …" line (for a destroy plan with nothing in the state, its own words too). */
export function planLine(s: PlanSummary): string {
  if (hasChanges(s)) return `Plan: ${s.add} to add, ${s.change} to change, ${s.destroy} to destroy.`;
  return s.mode === 'destroy' ? 'No changes. No objects need to be destroyed.' : 'No changes. The infrastructure matches the configuration.';
}

export interface PlanGroup {
  action: PlanAction;
  /** Heading of the group. */
  title: string;
  /** Terraform's symbol for the action (`+`, `~`, `-/+`, `-`, `<=`). */
  symbol: string;
  resources: PlanResource[];
}

const GROUP: Record<PlanAction, { title: string; symbol: string }> = {
  create: { title: 'Create', symbol: '+' },
  update: { title: 'Update in place', symbol: '~' },
  replace: { title: 'Replace (destroy, then create)', symbol: '-/+' },
  delete: { title: 'Destroy', symbol: '-' },
  read: { title: 'Read (data sources)', symbol: '<=' },
};

/** The changes grouped by action, in Terraform's order, empty groups left out; addresses sorted. */
export function groupByAction(resources: PlanResource[]): PlanGroup[] {
  return ACTIONS.map((action) => ({
    action,
    ...GROUP[action],
    resources: resources.filter((r) => r.action === action).sort((a, b) => a.address.localeCompare(b.address)),
  })).filter((g) => g.resources.length > 0);
}

export type ApplyGate = { ok: true } | { ok: false; reason: string };

/**
 * Whether the Apply button may be pressed for this plan command: only a succeeded plan with
 * changes, and only once (an apply already started for it).
 */
export function applyGate(plan: Pick<Command, 'type' | 'status' | 'result' | 'params'> | null, applyStarted = false): ApplyGate {
  if (!plan) return { ok: false, reason: 'Loading the plan…' };
  if (plan.type !== 'terraform_plan') return { ok: false, reason: 'This command is not a Terraform plan.' };
  const destroy = isDestroyPlan(plan);
  if (applyStarted) return { ok: false, reason: 'This plan is being applied (a plan is applied at most once).' };
  if (!isTerminal(plan.status)) return { ok: false, reason: destroy ? 'Approve is possible once the destroy plan has succeeded.' : 'Apply is possible once the plan has succeeded.' };
  if (plan.status !== 'succeeded') return { ok: false, reason: 'The plan did not succeed: there is nothing to apply.' };
  const s = planSummary(plan.result);
  if (!s) return { ok: false, reason: 'The plan has no summary to apply.' };
  // Asked as a destroy plan, made as a normal one (or the reverse): the control plane refuses it too.
  if (destroy && s.mode !== 'destroy') return { ok: false, reason: "The agent made a normal plan, not a destroy plan (its tendril predates destroy plans): it cannot be approved as a destroy." };
  if (!destroy && s.mode === 'destroy') return { ok: false, reason: 'This destroy plan was not asked for: it cannot be applied.' };
  if (!hasChanges(s)) return { ok: false, reason: destroy ? "Nothing to destroy: the workspace's state has no resources." : 'Nothing to apply: the plan has no changes.' };
  return { ok: true };
}

/**
 * Whether "Approve destroy" may be pressed: the plan may be applied (applyGate) and the
 * workspace it acts on (`target.workspace`) has been typed exactly.
 */
export function destroyGate(plan: Pick<Command, 'type' | 'status' | 'result' | 'params' | 'target'> | null, typed: string, applyStarted = false): ApplyGate {
  const g = applyGate(plan, applyStarted);
  if (!g.ok) return g;
  const ws = plan?.target?.workspace;
  if (!ws) return { ok: false, reason: 'The plan names no workspace to confirm.' };
  if (!workspaceConfirmed(typed, ws)) return { ok: false, reason: 'Type the workspace name to approve the destroy.' };
  return { ok: true };
}

/**
 * What an error of a plan, an apply of a plan or a destroy means and what to do, for the codes
 * the agent and control plane report (docs/api.md, "Plan, then apply"); null for others.
 */
export function planErrorHint(code: string | null | undefined): string | null {
  switch (code) {
    case 'plan_stale':
      return "The workspace's state changed after this plan was made (another apply or destroy ran). Nothing was applied: plan again to see what would change now.";
    case 'plan_missing':
      return 'The agent no longer has this plan file: a plan is applied at most once, and kept for 24 hours. Plan again.';
    case 'plan_hash_mismatch':
      return 'The plan file on the agent is not the one that was reviewed (its SHA-256 differs). Nothing was applied: plan again.';
    case 'plan_invalid':
      return 'Only a succeeded plan can be applied, only on the agent that made it, and a destroy plan only as a destroy.';
    case 'source_invalid':
      return 'The command to take the configuration from is not a Terraform command.';
    case 'secrets_undecryptable':
      return "Its sensitive values were encrypted with another secrets key: submit the configuration again with its values.";
    default:
      return null;
  }
}

/** The error code of a finished command, when it has one. */
export function errorCode(cmd: Pick<Command, 'error'> | null | undefined): string | null {
  return commandError(cmd)?.code ?? null;
}

/** The state workspace a Terraform command acts on (`target.workspace`), or null. */
export function commandWorkspace(cmd: Pick<Command, 'target'>): string | null {
  return cmd.target?.workspace ?? null;
}

/**
 * The newest command per workspace out of a newest-first list (e.g. the `terraform_apply`
 * commands: each workspace's last apply).
 */
export function latestByWorkspace(commands: readonly Command[]): Map<string, Command> {
  const out = new Map<string, Command>();
  for (const c of commands) {
    const ws = commandWorkspace(c);
    if (ws && !out.has(ws)) out.set(ws, c);
  }
  return out;
}

/** A destroy is confirmed by typing the workspace name exactly (surrounding spaces ignored). */
export function workspaceConfirmed(typed: string, workspace: string): boolean {
  return typed.trim() === workspace;
}

/** The `meta` of the commands the UI starts. */
export const UI_META = { triggered_by: 'trellis-ui' } as const;

/**
 * Starts a `terraform_plan` with the configuration of `source` (an earlier Terraform command):
 * the control plane copies its params, the sensitive values too, which the browser only sees
 * as `***` (but not its `destroy`: a destroy plan only when `destroy` says so). Runs on
 * `agentId`, by default the source's agent. Answers the new command's id.
 */
export async function planAgain(m: Pick<Mutations, 'createCommand'>, source: Pick<Command, 'id' | 'agentId'>, agentId?: string, destroy = false): Promise<string> {
  const r = await m.createCommand({
    agentId: agentId ?? source.agentId,
    type: 'terraform_plan',
    params: destroy
      ? { source_command_id: source.id, destroy: true, meta: { ...UI_META, reason: 'destroy from the Deploy page' } }
      : { source_command_id: source.id, meta: { ...UI_META, reason: 'plan again' } },
  });
  return r.commandId;
}

/**
 * The agent a workspace's destroy plan runs on: the source command's agent if it can plan,
 * else an online agent that can, else any that can (the plan then waits for it); null when
 * none can. The plan's apply runs on the same agent (its plan file is kept there).
 */
export function destroyAgent(sourceAgentId: string | null | undefined, agents: readonly Pick<Agent, 'id' | 'status' | 'capabilities'>[]): string | null {
  const capable = agents.filter((a) => a.capabilities.includes('terraform_plan'));
  return (capable.find((a) => a.id === sourceAgentId) ?? capable.find((a) => a.status === 'online') ?? capable[0])?.id ?? null;
}
