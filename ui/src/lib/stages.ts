// Stage lists per command type, merging server stages with the expected ones, applying live
// events to a command snapshot, and the percent shown in progress bars.
import type { Command, CommandEventData, Stage, StageState } from './types';
import { commandError, isTerminal } from './types';

export const PROVISION_STAGES = [
  'clone_template',
  'configure_vm',
  'start_vm',
  'wait_network',
  'post_provision',
  'register',
] as const;

export const TERRAFORM_STAGES = ['fetch_template', 'init', 'apply', 'outputs'] as const;
export const TERRAFORM_PLAN_STAGES = ['fetch_template', 'init', 'plan', 'show'] as const;
export const TERRAFORM_DESTROY_STAGES = ['fetch_template', 'init', 'destroy'] as const;

/** `vm_power` and `destroy` (protocol/src/commands.rs). */
export const VM_POWER_STAGES = ['request', 'wait_state'] as const;
export const DESTROY_STAGES = ['check_tag', 'stop_vm', 'delete_vm', 'confirm_gone'] as const;

const LABELS: Record<string, string> = {
  clone_template: 'Clone template',
  configure_vm: 'Configure VM',
  start_vm: 'Start VM',
  wait_network: 'Wait for network',
  post_provision: 'Post-provision commands',
  register: 'Register node',
  fetch_template: 'Fetch template',
  init: 'terraform init',
  apply: 'terraform apply',
  outputs: 'Read outputs',
  plan: 'terraform plan',
  show: 'Summarise the plan',
  destroy: 'terraform destroy',
  request: 'Send the power request',
  wait_state: 'Wait for the new state',
  check_tag: 'Check the VM tag',
  stop_vm: 'Stop VM',
  delete_vm: 'Delete VM and disks',
  confirm_gone: 'Confirm the VM is gone',
};

export function stageLabel(name: string): string {
  return LABELS[name] ?? name.replace(/_/g, ' ').replace(/^./, (c) => c.toUpperCase());
}

export function expectedStages(type: string): readonly string[] {
  if (type === 'provision') return PROVISION_STAGES;
  if (type === 'terraform_apply') return TERRAFORM_STAGES;
  if (type === 'terraform_plan') return TERRAFORM_PLAN_STAGES;
  if (type === 'terraform_destroy') return TERRAFORM_DESTROY_STAGES;
  if (type === 'vm_power') return VM_POWER_STAGES;
  if (type === 'destroy') return DESTROY_STAGES;
  return [];
}

function blank(name: string): Stage {
  return { name, state: 'pending', startedAt: null, finishedAt: null, message: null };
}

/**
 * The stages to display: the expected ones for the type in order (pending when the server
 * has not reported them yet), then any extra stages the server reported.
 */
export function mergeStages(type: string, server: Stage[] | undefined | null): Stage[] {
  const byName = new Map((server ?? []).map((s) => [s.name, s]));
  const out: Stage[] = expectedStages(type).map((n) => byName.get(n) ?? blank(n));
  for (const s of server ?? []) if (!out.some((o) => o.name === s.name)) out.push(s);
  return out;
}

/** Applies one live event (stage / progress / finished) to a command snapshot. */
export function applyEvent(cmd: Command, kind: string, ev: CommandEventData): Command {
  const applied = applyEventInner(cmd, kind, ev);
  if (applied === cmd || typeof ev.seq !== 'number') return applied;
  return { ...applied, lastSeq: Math.max(applied.lastSeq ?? 0, ev.seq) };
}

function applyEventInner(cmd: Command, kind: string, ev: CommandEventData): Command {
  const ts = ev.ts ?? new Date().toISOString();
  switch (kind) {
    case 'stage': {
      if (!ev.stage) return cmd;
      const state: StageState = ev.state ?? 'running';
      const stages = mergeStages(cmd.type, cmd.stages).map((s) => {
        if (s.name !== ev.stage) return s;
        return {
          ...s,
          state,
          startedAt: s.startedAt ?? (state === 'pending' ? null : ts),
          finishedAt: state === 'running' || state === 'pending' ? null : ts,
          message: ev.message ?? s.message,
        };
      });
      if (!stages.some((s) => s.name === ev.stage)) {
        stages.push({ ...blank(ev.stage), state, startedAt: ts, message: ev.message ?? null });
      }
      const running = state === 'running';
      return {
        ...cmd,
        startedAt: cmd.startedAt ?? ts,
        stages,
        stage: running ? ev.stage : cmd.stage,
        percent: ev.percent ?? cmd.percent,
        status: running && !isTerminal(cmd.status) ? 'running' : cmd.status,
      };
    }
    case 'progress':
      return {
        ...cmd,
        startedAt: cmd.startedAt ?? ts,
        percent: ev.percent ?? cmd.percent,
        stage: ev.stage ?? cmd.stage,
      };
    case 'finished': {
      const status = ev.status ?? cmd.status;
      let stages = cmd.stages;
      if (ev.error?.stage && stages) {
        stages = stages.map((s) => (s.name === ev.error?.stage && s.state === 'running' ? { ...s, state: 'failed', finishedAt: ts } : s));
      }
      return {
        ...cmd,
        status,
        result: ev.result !== undefined ? ev.result : cmd.result,
        error: ev.error !== undefined ? ev.error : cmd.error,
        percent: status === 'succeeded' ? 100 : cmd.percent,
        finishedAt: cmd.finishedAt ?? ts,
        stages,
      };
    }
    default:
      return cmd;
  }
}

const STATE_RANK: Record<string, number> = { pending: 0, running: 1, completed: 2, failed: 2, skipped: 2 };

/**
 * Merges a snapshot (a poll, or an SSE `status` event without stages) into what we have.
 * A snapshot taken before events we already applied (its `lastSeq` is lower) must not move
 * anything backwards: stages keep the more advanced state, a terminal status stays.
 */
export function mergeSnapshot(prev: Command | null, next: Command): Command {
  if (!prev || prev.id !== next.id) return next;
  const stale = typeof next.lastSeq === 'number' && typeof prev.lastSeq === 'number' && next.lastSeq < prev.lastSeq;
  // Snapshots can arrive out of order with the same lastSeq (accepting a command stores no
  // event): a status never goes back (running → dispatched) and a time once known stays.
  const times = {
    dispatchedAt: next.dispatchedAt ?? prev.dispatchedAt,
    startedAt: next.startedAt ?? prev.startedAt,
    finishedAt: next.finishedAt ?? prev.finishedAt,
  };
  if (!stale) {
    const back = (STATUS_RANK[next.status] ?? 0) < (STATUS_RANK[prev.status] ?? 0);
    return { ...prev, ...next, ...times, status: back ? prev.status : next.status, stages: next.stages ?? prev.stages };
  }
  let stages = prev.stages;
  if (next.stages) {
    const mine = new Map((prev.stages ?? []).map((st) => [st.name, st]));
    stages = next.stages.map((st) => {
      const m = mine.get(st.name);
      return m && (STATE_RANK[m.state] ?? 0) > (STATE_RANK[st.state] ?? 0) ? m : st;
    });
    for (const m of prev.stages ?? []) if (!stages.some((st) => st.name === m.name)) stages.push(m);
  }
  const keepPrevStatus = isTerminal(prev.status) && !isTerminal(next.status);
  return {
    ...prev,
    ...next,
    lastSeq: prev.lastSeq,
    status: keepPrevStatus ? prev.status : next.status,
    stage: keepPrevStatus ? prev.stage : (prev.stage ?? next.stage),
    percent: Math.max(prev.percent ?? 0, next.percent ?? 0) || (next.percent ?? prev.percent),
    result: next.result ?? prev.result,
    error: next.error ?? prev.error,
    ...times,
    stages,
  };
}

const STATUS_RANK: Record<string, number> = { queued: 0, dispatched: 1, running: 2, succeeded: 3, failed: 3, cancelled: 3, timed_out: 3 };

/**
 * The percent to show (0–100): the larger of the command's own percent and the share of
 * finished stages (a running stage counts half); 100 once succeeded.
 */
export function commandPercent(cmd: Pick<Command, 'status' | 'percent' | 'type' | 'stages'>): number {
  if (cmd.status === 'succeeded') return 100;
  const reported =
    typeof cmd.percent === 'number' && Number.isFinite(cmd.percent) ? Math.max(0, Math.min(100, cmd.percent)) : null;
  const stages = mergeStages(cmd.type, cmd.stages);
  let derived = 0;
  if (stages.length > 0) {
    let done = 0;
    for (const s of stages) {
      if (s.state === 'completed' || s.state === 'skipped') done += 1;
      else if (s.state === 'running') done += 0.5;
    }
    derived = Math.round((done / stages.length) * 100);
  }
  // An agent may report 0 % while a stage runs; never show less than the stages say.
  return reported === null ? derived : Math.max(reported, derived);
}

/** The stage that failed: the error's stage, else the first stage in state failed, else the running one. */
export function failedStage(cmd: Pick<Command, 'error' | 'stages' | 'stage'>): string | null {
  const errStage = commandError(cmd)?.stage;
  if (errStage) return errStage;
  const f = cmd.stages?.find((s) => s.state === 'failed');
  if (f) return f.name;
  return cmd.stage ?? null;
}

/** VM id and IP from a provision result (snake_case from the agent, camelCase tolerated). */
export function provisionOutcome(result: unknown): { vmId: number | null; ip: string | null; node: string | null } {
  const r = (result ?? {}) as Record<string, unknown>;
  const vm = r.vm_id ?? r.vmId ?? r.vmid;
  const ip = r.ip_address ?? r.ipAddress;
  const node = r.node;
  return {
    vmId: typeof vm === 'number' ? vm : typeof vm === 'string' && vm ? Number(vm) : null,
    ip: typeof ip === 'string' && ip ? ip : null,
    node: typeof node === 'string' ? node : null,
  };
}
