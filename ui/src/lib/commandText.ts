// Sentences the command page (and the provision wizard) say about how a command ended and
// what it acts on, kept apart from the components so they can be tested.
import type { Command } from './types';
import { commandError } from './types';
import { stageLabel } from './stages';

/** What the command acts on, in words: node name, VM, or Terraform workspace. */
export function targetLabel(cmd: Pick<Command, 'target'>): string | null {
  const t = cmd.target;
  if (!t) return null;
  if (t.nodeName) return t.nodeName;
  if (t.workspace) return t.workspace;
  if (t.vmId != null) return `VM ${t.vmId}${t.proxmoxNode ? ` on ${t.proxmoxNode}` : ''}`;
  if (t.nodeId) return 'deleted node';
  return null;
}

/** The one sentence for a cancelled command (instead of "cancelled cancelled by request: …"). */
export function cancelledSentence(cmd: Pick<Command, 'status' | 'startedAt' | 'error' | 'stage' | 'stages'>): string | null {
  if (cmd.status !== 'cancelled') return null;
  if (!cmd.startedAt) return 'Cancelled on request before it started; nothing was done.';
  const e = commandError(cmd);
  const stage = e?.stage ?? cmd.stages?.find((s) => s.state === 'failed' || s.state === 'running')?.name ?? cmd.stage ?? null;
  return `Cancelled on request${stage ? ` during “${stageLabel(stage)}”` : ''}.`;
}

/**
 * What became of the VM a failed, cancelled or timed-out provision had started to build,
 * from the error's details (`{vm_id, node, status: cleaned_up | partial, cleanup_error?}`):
 * removed, kept on purpose (keep on failure), or left behind because removing it failed.
 * Null when the provision had not made a VM yet or the agent did not say.
 */
export function vmCleanupSentence(cmd: Pick<Command, 'type' | 'status' | 'error'>): { text: string; tone: 'info' | 'warn' } | null {
  if (cmd.type !== 'provision' || cmd.status === 'succeeded') return null;
  const d = commandError(cmd)?.details;
  if (!d || typeof d !== 'object') return null;
  const r = d as Record<string, unknown>;
  const vm = typeof r.vm_id === 'number' || typeof r.vm_id === 'string' ? String(r.vm_id) : null;
  if (!vm) return null;
  const on = typeof r.node === 'string' && r.node ? ` on ${r.node}` : '';
  if (r.status === 'cleaned_up') return { text: `The partly built VM ${vm}${on} was removed.`, tone: 'info' };
  if (typeof r.cleanup_error === 'string' && r.cleanup_error)
    return { text: `The partly built VM ${vm}${on} could not be removed (${r.cleanup_error}); it is still there.`, tone: 'warn' };
  if (r.status === 'partial') return { text: `The partly built VM ${vm}${on} was kept for inspection (keep on failure).`, tone: 'warn' };
  return null;
}

/** When the command started: its own `startedAt`, else the first stage that started. */
export function startedAt(cmd: Pick<Command, 'startedAt' | 'stages'>): string | null {
  if (cmd.startedAt) return cmd.startedAt;
  const ts = (cmd.stages ?? []).map((s) => s.startedAt).filter((s): s is string => !!s);
  return ts.length ? ts.reduce((a, b) => (Date.parse(a) <= Date.parse(b) ? a : b)) : null;
}
