// Many nodes at once: the name pattern (`web-{n}`) expanded exactly as the control plane
// does it, the state of a bulk provision's progress grid, and the two bulk endpoints
// (POST /api/nodes/batches, POST /api/nodes/bulk).
import { request } from './api';
import type { components } from './api.gen';
import type { VmNode } from './types';
import { stageLabel } from './stages';
import { validateVmName, type Check } from './validation';

type Schemas = components['schemas'];
export type BulkProvisionRequest = Schemas['BulkProvisionRequest'];
export type BatchStarted = Schemas['BatchStarted'];
export type BulkNodeAction = Schemas['BulkNodeAction'];
export type BulkActionResults = Schemas['BulkActionResults'];
export type BulkNodeResult = Schemas['BulkNodeResult'];

export const MAX_BATCH = 50;
export const PLACEHOLDER = '{n}';

export const bulkApi = {
  provision: (body: BulkProvisionRequest) => request<BatchStarted>('/api/nodes/batches', { method: 'POST', body }),
  batchNodes: (batchId: string, signal?: AbortSignal) =>
    request<{ items: VmNode[] }>(`/api/nodes?batchId=${encodeURIComponent(batchId)}`, { signal }).then((r) => r.items),
  action: (nodeIds: string[], action: BulkNodeAction, confirmNames: string[] = []) =>
    request<BulkActionResults>('/api/nodes/bulk', {
      method: 'POST',
      body: { nodeIds, action, ...(action === 'destroy' ? { confirmNames } : {}) },
    }),
};

/** The count field: a whole number from 1 to 50. */
export function validateCount(raw: string): Check {
  const s = raw.trim();
  if (!/^\d+$/.test(s)) return 'Count must be a whole number.';
  const n = Number(s);
  if (n < 1 || n > MAX_BATCH) return `Count must be between 1 and ${MAX_BATCH}.`;
  return null;
}

/** Parses the count field; 1 when it is not valid (the single-node wizard). */
export function countOf(raw: string): number {
  return validateCount(raw) ? 1 : Number(raw.trim());
}

export interface Expansion {
  names: string[];
  error: Check;
}

/**
 * The names a pattern makes: `{n}` counts from 1 and skips names already taken (ignoring
 * case), as the server does; without `{n}` (count 1 only) the pattern is the name.
 */
export function expandNames(pattern: string, count: number, taken: Iterable<string> = []): Expansion {
  const used = new Set<string>();
  for (const t of taken) used.add(t.toLowerCase());
  const p = pattern.trim();
  const parts = p.split(PLACEHOLDER);
  if (parts.length > 2) return { names: [], error: 'Use {n} only once in the name pattern.' };
  if (parts.length === 1) {
    if (count > 1) return { names: [], error: 'Add {n} to the name for more than one node, e.g. web-{n}.' };
    const err = validateVmName(pattern);
    if (err) return { names: [], error: err };
    if (used.has(p.toLowerCase())) return { names: [], error: `A node named ${p} already exists.` };
    return { names: [p], error: null };
  }
  const [head, tail] = parts;
  const names: string[] = [];
  for (let n = 1; names.length < count; n++) {
    const name = `${head}${n}${tail}`;
    if (used.has(name.toLowerCase())) continue;
    const err = validateVmName(name);
    if (err) return { names, error: `${name}: ${err}` };
    names.push(name);
  }
  return { names, error: null };
}

/** A short preview: the first names, "…", and the last. */
export function previewNames(names: string[], max = 6): string {
  if (names.length <= max) return names.join(', ');
  return `${names.slice(0, max - 1).join(', ')}, …, ${names[names.length - 1]}`;
}

export type RowState = 'waiting' | 'active' | 'done' | 'failed' | 'other';

export interface GridRow {
  id: string;
  name: string;
  state: RowState;
  /** What it is doing: "Waiting for a slot", "Clone template", "Running", … */
  label: string;
  percent: number;
  vmId: number | null;
  ip: string | null;
  error: string | null;
  attempt: number | null;
}

/** One row of the progress grid from a node of the batch. */
export function gridRow(n: VmNode): GridRow {
  const p = n.progress ?? null;
  let state: RowState;
  let label: string;
  let percent = 0;
  if (p) {
    const waiting = p.commandStatus === 'queued';
    state = waiting ? 'waiting' : 'active';
    label = waiting ? 'Waiting for a slot' : p.stage ? stageLabel(p.stage) : 'Starting';
    percent = p.percent ?? 0;
  } else if (n.status === 'running') {
    state = 'done';
    label = 'Running';
    percent = 100;
  } else if (n.status === 'failed') {
    state = 'failed';
    label = 'Failed';
  } else if (n.status === 'provisioning') {
    // Between the command's end and the node's update: a moment.
    state = 'active';
    label = 'Finishing';
    percent = 100;
  } else {
    state = 'other';
    label = n.status.replace(/_/g, ' ');
  }
  return {
    id: n.id,
    name: n.name,
    state,
    label,
    percent,
    vmId: n.vmId ?? null,
    ip: n.ipAddress ?? null,
    error: state === 'failed' || state === 'done' ? (n.error ?? null) : null,
    attempt: p?.attempt ?? null,
  };
}

export interface GridSummary {
  total: number;
  waiting: number;
  active: number;
  done: number;
  failed: number;
  /** No node has a command running: polling may stop. */
  settled: boolean;
  failedIds: string[];
}

export function summarize(rows: GridRow[]): GridSummary {
  const s: GridSummary = { total: rows.length, waiting: 0, active: 0, done: 0, failed: 0, settled: true, failedIds: [] };
  for (const r of rows) {
    if (r.state === 'waiting') s.waiting++;
    if (r.state === 'active') s.active++;
    if (r.state === 'done') s.done++;
    if (r.state === 'failed') {
      s.failed++;
      s.failedIds.push(r.id);
    }
    if (r.state === 'waiting' || r.state === 'active') s.settled = false;
  }
  return s;
}

/** "3 started, 1 refused: web-4 (invalid_state: …)" for a bulk action's answer. */
export function describeResults(r: BulkActionResults): string {
  const failed = r.results.filter((x) => x.error);
  const head = `${r.succeeded} started${failed.length ? `, ${failed.length} refused` : ''}`;
  if (!failed.length) return head;
  return `${head}: ${failed.map((x) => `${x.name ?? x.nodeId} (${x.error?.code}: ${x.error?.message})`).join('; ')}`;
}

/** What a node's running command is doing, for the Nodes table: "Configure VM 40%". */
export function nodeProgressText(n: Pick<VmNode, 'progress'>): string | null {
  const p = n.progress;
  if (!p) return null;
  if (p.commandStatus === 'queued') return 'queued';
  const stage = p.stage ? stageLabel(p.stage) : 'starting';
  return p.percent != null ? `${stage} ${Math.round(p.percent)}%` : stage;
}
