// Which lifecycle actions a node offers, as pure functions of its status, its VM and the
// command running on it (mirrors the control plane's rules in control-plane/src/model.rs and
// domain/nodes.rs, so the UI offers only what the server would accept).
import type { Command, CommandStatus, NodeStatus, PowerAction, VmNode } from '../lib/types';
import { isTerminal } from '../lib/types';

export type NodeAction = 'provision' | PowerAction | 'destroy' | 'forget' | 'delete';

/** Labels of the power actions (menu items, progress text). */
export const POWER_LABEL = {
  start: 'Start',
  shutdown: 'Shutdown',
  stop: 'Stop (force)',
  reboot: 'Reboot',
} as const satisfies Record<PowerAction, string>;

/** The verb of each power action, for messages ("Could not stop web-1"). */
export const POWER_VERB = {
  start: 'start',
  shutdown: 'shut down',
  stop: 'stop',
  reboot: 'reboot',
} as const satisfies Record<PowerAction, string>;

/** The running form of each power action ("Stopping…"). */
export const POWER_PROGRESS = {
  start: 'Starting',
  shutdown: 'Shutting down',
  stop: 'Stopping',
  reboot: 'Rebooting',
} as const satisfies Record<PowerAction, string>;

/** Power actions in menu order. */
export const POWER_ACTIONS: PowerAction[] = ['start', 'shutdown', 'stop', 'reboot'];

/** Power actions by status (a node with a VM only): what makes sense for where it is. */
const POWER_BY_STATUS = {
  pending_provision: [],
  provisioning: [],
  running: ['shutdown', 'stop', 'reboot'],
  stopped: ['start'],
  // A failed provision (kept VM) or destroy may leave it either way: start it, or power it off.
  failed: ['start', 'stop'],
  destroying: [],
  destroyed: [],
  missing: [],
} as const satisfies Record<NodeStatus, readonly PowerAction[]>;

/** Statuses a destroy may start from (with a VM). A missing VM's destroy ends `destroyed`. */
const DESTROYABLE = new Set<NodeStatus>(['running', 'stopped', 'failed', 'missing']);

/** A command owns the node while it is in these statuses. */
const TRANSITIONAL = new Set<NodeStatus>(['provisioning', 'destroying']);

/** A command is changing the node: its status says so, or its last command is not terminal. */
export function nodeBusy(node: Pick<VmNode, 'status' | 'lastCommandId'>, lastCommandStatus: CommandStatus | null | undefined): boolean {
  if (TRANSITIONAL.has(node.status)) return true;
  return !!node.lastCommandId && !!lastCommandStatus && !isTerminal(lastCommandStatus);
}

/** The node's VM exists as far as Trellis knows (not destroyed, not gone from the inventory). */
export function hasLiveVm(node: Pick<VmNode, 'vmId' | 'status'>): boolean {
  return node.vmId != null && node.status !== 'destroyed' && node.status !== 'missing';
}

export interface ActionAvailability {
  /** Offered at all for this status. */
  offered: boolean;
  /** Why it cannot be used right now (offered but disabled), or null. */
  reason: string | null;
}

const BUSY_REASON = 'Wait for the running command to finish';

/**
 * Whether `action` is offered for the node and, if so, why it is disabled (null = usable).
 * `lastCommandStatus` is the status of `node.lastCommandId`'s command when known.
 */
export function actionAvailability(
  node: Pick<VmNode, 'status' | 'vmId' | 'lastCommandId'>,
  action: NodeAction,
  lastCommandStatus?: CommandStatus | null,
): ActionAvailability {
  const busy = nodeBusy(node, lastCommandStatus);
  const gate = (offered: boolean): ActionAvailability => ({ offered, reason: offered && busy ? BUSY_REASON : null });
  switch (action) {
    case 'provision':
      return gate(node.vmId == null && (node.status === 'pending_provision' || node.status === 'failed'));
    case 'destroy':
      return gate(node.vmId != null && DESTROYABLE.has(node.status));
    case 'forget':
      // Forgetting keeps the VM: only meaningful while there is one (and no command owns the node).
      return gate(hasLiveVm(node) && !TRANSITIONAL.has(node.status));
    case 'delete':
      // Only a record without a live VM (never made, destroyed, missing); see DELETE /api/nodes/{id}.
      return gate(!hasLiveVm(node) && !TRANSITIONAL.has(node.status));
    default:
      return gate(node.vmId != null && (POWER_BY_STATUS[node.status] as readonly PowerAction[]).includes(action));
  }
}

/** The power actions offered for the node, in menu order. */
export function powerActions(node: Pick<VmNode, 'status' | 'vmId' | 'lastCommandId'>): PowerAction[] {
  return POWER_ACTIONS.filter((a) => actionAvailability(node, a).offered);
}

/** Whether the typed confirmation matches the node's name exactly (as the server checks it). */
export function destroyConfirmed(typed: string, nodeName: string): boolean {
  return typed === nodeName && nodeName !== '';
}

/** What the destroy confirmation says about what was typed (null: nothing to say yet). */
export function destroyConfirmHint(typed: string, nodeName: string): string | null {
  if (typed === '' || destroyConfirmed(typed, nodeName)) return null;
  if (typed.trim() === nodeName) return 'Remove the spaces around the name.';
  if (typed.toLowerCase() === nodeName.toLowerCase()) return 'The name is case-sensitive.';
  if (nodeName.startsWith(typed)) return null; // still typing
  return 'This does not match the node name.';
}

/** What the command running on a node is doing, for its progress label. */
export function commandActivity(cmd: Pick<Command, 'type' | 'params'> | null | undefined, status: NodeStatus): string {
  if (status === 'provisioning') return 'Provisioning';
  if (status === 'destroying') return 'Destroying';
  if (!cmd) return 'Working';
  if (cmd.type === 'vm_power') {
    const a = (cmd.params as { action?: unknown } | null)?.action;
    if (typeof a === 'string' && Object.hasOwn(POWER_PROGRESS, a)) return POWER_PROGRESS[a as PowerAction];
    return 'Changing power state';
  }
  if (cmd.type === 'destroy') return 'Destroying';
  if (cmd.type === 'provision') return 'Provisioning';
  return 'Working';
}

/** The cloud-init user a provision command gave its VM (`params.clone_options.ci_user`). */
export function provisionCiUser(cmd: { type: string; params?: unknown } | null | undefined): string | null {
  if (!cmd || cmd.type !== 'provision' || !cmd.params || typeof cmd.params !== 'object') return null;
  const o = (cmd.params as Record<string, unknown>).clone_options;
  if (!o || typeof o !== 'object') return null;
  const u = (o as Record<string, unknown>).ci_user;
  return typeof u === 'string' && u.trim() ? u.trim() : null;
}

/**
 * The command "Copy SSH command" copies: `ssh user@ip`, the user being the cloud-init user
 * the node was provisioned with (its last command, when that is its provision: the options
 * as sent, a per-node user included), else its template's (`cloneDefaults.ciUser`); plain
 * `ssh ip` when none is known.
 */
export function sshCommand(
  node: Pick<VmNode, 'ipAddress' | 'templateId'>,
  templates: { id: string; cloneDefaults?: { ciUser?: string | null } | null }[],
  lastCommand?: { type: string; params?: unknown } | null,
): string {
  const user = provisionCiUser(lastCommand) ?? templates.find((t) => t.id === node.templateId)?.cloneDefaults?.ciUser?.trim();
  const ip = node.ipAddress ?? '';
  return user ? `ssh ${user}@${ip}` : `ssh ${ip}`;
}

/**
 * A node's size as the Nodes table shows it. An imported VM's memory and cores are not
 * known (stored as 0) until someone sets them: "size unknown", never "0 MiB · 0 cores".
 */
export function nodeSizeText(node: Pick<VmNode, 'memory' | 'cores'>, formatMemory: (mib: number) => string): string {
  const mem = node.memory > 0 ? formatMemory(node.memory) : null;
  const cores = node.cores > 0 ? `${node.cores} ${node.cores === 1 ? 'core' : 'cores'}` : null;
  if (!mem && !cores) return 'size unknown';
  return `${mem ?? 'memory unknown'} · ${cores ?? 'cores unknown'}`;
}
