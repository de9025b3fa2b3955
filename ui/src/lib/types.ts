// Types of the Trellis HTTP API (docs/api.md). Field names are the wire names.

export type AgentStatus = 'online' | 'offline';

export interface Agent {
  id: string;
  name: string;
  status: AgentStatus;
  lastHeartbeat: string | null;
  connectedAt: string | null;
  version: string | null;
  hostname: string | null;
  capabilities: string[];
  facts: Record<string, unknown> | null;
  maxConcurrency: number | null;
  createdAt: string;
}

export type CommandType = 'ping' | 'provision' | 'list_templates' | 'terraform_apply';

export type CommandStatus =
  | 'queued'
  | 'dispatched'
  | 'running'
  | 'succeeded'
  | 'failed'
  | 'cancelled'
  | 'timed_out';

export const COMMAND_STATUSES: CommandStatus[] = [
  'queued',
  'dispatched',
  'running',
  'succeeded',
  'failed',
  'cancelled',
  'timed_out',
];

export const COMMAND_TYPES: CommandType[] = ['provision', 'terraform_apply', 'list_templates', 'ping'];

export type StageState = 'pending' | 'running' | 'completed' | 'failed' | 'skipped';

export interface Stage {
  name: string;
  state: StageState;
  startedAt: string | null;
  finishedAt: string | null;
  message: string | null;
}

export interface CommandError {
  code: string;
  message: string;
  retryable: boolean;
  stage?: string | null;
  details?: unknown;
}

export interface Command {
  id: string;
  agentId: string;
  type: CommandType | string;
  params: unknown;
  status: CommandStatus;
  stage: string | null;
  percent: number | null;
  result: unknown;
  error: CommandError | null;
  attempt: number;
  rootCommandId: string | null;
  retryOf: string | null;
  idempotencyKey: string | null;
  createdBy: string | null;
  createdAt: string;
  dispatchedAt: string | null;
  startedAt: string | null;
  finishedAt: string | null;
  deadlineAt: string | null;
  cancelRequested: boolean;
  lastSeq: number;
  stages?: Stage[];
}

export type LogStream = 'stdout' | 'stderr' | 'system';

export interface LogChunk {
  seq: number;
  /** RFC 3339, or Unix milliseconds from some servers. */
  ts: string | number;
  stream: LogStream;
  data: string;
}

/** Data of an SSE `log|stage|progress|finished` event. */
export interface CommandEventData {
  seq: number;
  ts?: string;
  kind?: string;
  stream?: LogStream;
  data?: string;
  stage?: string;
  state?: StageState;
  percent?: number;
  message?: string;
  status?: CommandStatus;
  result?: unknown;
  error?: CommandError | null;
}

export interface ProxmoxTemplate {
  vmid: number;
  name: string;
  node: string;
  memory: number;
  cores: number;
  diskBytes: number | null;
}

export interface Template {
  id: string;
  name: string;
  description: string | null;
  memory: number;
  cores: number;
  proxmoxTemplateId: number | null;
  proxmoxNode: string | null;
  networkBridge: string | null;
  preProvisionCommands: string[];
  postProvisionCommands: string[];
  system: boolean;
  createdAt: string;
  updatedAt: string;
}

export type TemplateInput = Omit<Template, 'id' | 'system' | 'createdAt' | 'updatedAt'>;

export type NodeStatus = 'pending_provision' | 'provisioning' | 'running' | 'failed' | 'stopped';

export interface VmNode {
  id: string;
  application: string | null;
  name: string;
  templateId: string;
  memory: number;
  cores: number;
  vmId: number | null;
  hypervisorId: string | null;
  ipAddress: string | null;
  status: NodeStatus;
  lastCommandId: string | null;
  error: string | null;
  createdAt: string;
  updatedAt: string;
}

export const TERMINAL_STATUSES: CommandStatus[] = ['succeeded', 'failed', 'cancelled', 'timed_out'];

export function isTerminal(status: CommandStatus | string | null | undefined): boolean {
  return TERMINAL_STATUSES.includes(status as CommandStatus);
}
