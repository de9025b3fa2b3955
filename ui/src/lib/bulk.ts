// Many nodes at once: the name pattern (`web-{n}`) expanded exactly as the control plane
// does it, the state of a bulk provision's progress grid, and the two bulk endpoints
// (POST /api/nodes/batches, POST /api/nodes/bulk).
import { request } from './api';
import type { components } from './api.gen';
import { NODE_STATUS_LABEL, type VmNode } from './types';
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

/**
 * The names existing nodes hold, as the server counts them: every node except a
 * `destroyed` one (its VM is gone; its record is only history). Forgotten nodes have no
 * record. Compared ignoring case by `expandNames`.
 */
export function takenNames(nodes: readonly Pick<VmNode, 'name' | 'status'>[]): string[] {
  return nodes.filter((n) => n.status !== 'destroyed').map((n) => n.name);
}

export const MAX_VMID = 999999999;

/** The VMID and static address of each node of a batch, or why the range is refused. */
export interface PerNode {
  vmIds: number[] | null;
  /** `a.b.c.d/prefix` per node. */
  addresses: string[] | null;
  error: string | null;
}

function ipv4(s: string): number | null {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(s.trim());
  if (!m) return null;
  const parts = m.slice(1).map(Number);
  if (parts.some((p) => p > 255)) return null;
  return ((parts[0] << 24) >>> 0) + (parts[1] << 16) + (parts[2] << 8) + parts[3];
}

function ipText(n: number): string {
  return [n >>> 24, (n >>> 16) & 255, (n >>> 8) & 255, n & 255].join('.');
}

/**
 * A bulk provision's explicit VMID and static address are start values, as the server
 * applies them: node `i` (0-based) gets `vmId + i` and `address + i` in the same network
 * (gateway unchanged). Refused, as by the server, when a VMID passes 999999999 or an
 * address leaves the subnet, is its network or broadcast address (prefixes up to /30) or
 * the gateway. Values that are not valid at all are left to the field checks.
 */
export function perNodeValues(count: number, vmId: string, ipAddress: string | null, gateway: string | null): PerNode {
  const out: PerNode = { vmIds: null, addresses: null, error: null };
  const start = vmId.trim() ? Number(vmId.trim()) : NaN;
  if (Number.isInteger(start) && start >= 100) {
    const last = start + count - 1;
    if (last > MAX_VMID) {
      out.error = `VMIDs ${start} – ${last}: above the highest VMID ${MAX_VMID}. Choose a lower first VMID.`;
      return out;
    }
    out.vmIds = Array.from({ length: count }, (_, i) => start + i);
  }
  const [addr, prefixText] = (ipAddress ?? '').trim().split('/');
  const ip = addr ? ipv4(addr) : null;
  const prefix = Number(prefixText);
  if (ip === null || !/^\d+$/.test(prefixText ?? '') || prefix > 32) return out;
  const mask = prefix === 0 ? 0 : (0xffffffff << (32 - prefix)) >>> 0;
  const network = (ip & mask) >>> 0;
  const broadcast = (network | (~mask >>> 0)) >>> 0;
  const gw = gateway ? ipv4(gateway) : null;
  const addresses: string[] = [];
  for (let i = 0; i < count; i++) {
    const a = ip + i;
    if (i > 0) {
      const where = `${ipText(network)}/${prefix}`;
      if (a > 0xffffffff || ((a & mask) >>> 0) !== network) {
        out.error = `Node ${i + 1} would get an address outside ${where}. Start lower or use a larger subnet.`;
        return out;
      }
      if (prefix <= 30 && (a === network || a === broadcast)) {
        out.error = `Node ${i + 1} would get ${ipText(a)}, the broadcast address of ${where}. Start lower or use a larger subnet.`;
        return out;
      }
      if (gw !== null && a === gw) {
        out.error = `Node ${i + 1} would get ${ipText(a)}, the gateway’s address. Choose a range without the gateway.`;
        return out;
      }
    }
    addresses.push(`${ipText(a)}/${prefix}`);
  }
  out.addresses = addresses;
  return out;
}

/** "web-1 (VMID 500, 10.0.0.10/24)": a name with its own VMID and address, when set. */
export function withPerNode(names: string[], per: PerNode | null): string[] {
  if (!per) return names;
  return names.map((n, i) => {
    const extra = [per.vmIds ? `VMID ${per.vmIds[i]}` : null, per.addresses ? per.addresses[i] : null].filter(Boolean);
    return extra.length ? `${n} (${extra.join(', ')})` : n;
  });
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

/** The nodes the Nodes page's filter shows (name, application, IP, status, VM id). */
export function nodesMatching<N extends Pick<VmNode, 'name' | 'application' | 'ipAddress' | 'status' | 'vmId'>>(items: N[], filter: string): N[] {
  const q = filter.trim().toLowerCase();
  if (!q) return items;
  return items.filter((n) => [n.name, n.application ?? '', n.ipAddress ?? '', n.status, NODE_STATUS_LABEL[n.status], String(n.vmId ?? '')].some((v) => v.toLowerCase().includes(q)));
}

/**
 * The nodes a bulk action acts on: the selected ones the filter shows. A node selected and
 * then hidden by the filter is not acted on (nor counted in the action bar).
 */
export function selectedShown<N extends Pick<VmNode, 'id'>>(shown: N[], selected: ReadonlySet<string>): N[] {
  return shown.filter((n) => selected.has(n.id));
}
