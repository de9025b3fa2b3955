// Types of the Trellis HTTP API. They come from the OpenAPI document the control plane
// generates from its Rust types (docs/openapi.json → `npm run gen:api` → api.gen.ts); only what
// the document does not describe (SSE event data, the shape of `Command.error`, stage states,
// command types) is written by hand here. Field names are the wire names; optional fields are
// `T | null | undefined`, timestamps RFC 3339 strings.
import type { components } from './api.gen';

type Schemas = components['schemas'];

export type Agent = Schemas['Agent'];
export type AgentStatus = Schemas['AgentStatus'];
export type AgentList = Schemas['AgentList'];
export type AgentTemplates = Schemas['AgentTemplates'];
export type CreateAgentRequest = Schemas['CreateAgentRequest'];
export type CreatedAgent = Schemas['CreatedAgent'];
export type InstallInfo = Schemas['InstallInfo'];
export type NewToken = Schemas['NewToken'];
export type SessionInfo = Schemas['SessionInfo'];
export type AuditEntry = Schemas['AuditEntry'];
export type AuditList = Schemas['AuditList'];

export type Command = Schemas['Command'];
export type CommandStatus = Schemas['CommandStatus'];
export type CommandList = Schemas['CommandList'];
export type CommandAccepted = Schemas['CommandAccepted'];
export type CreateCommandRequest = Schemas['CreateCommandRequest'];
export type Stage = Schemas['Stage'];
export type LogPage = Schemas['LogPage'];
export type LogChunk = Schemas['LogLine'];

export type Template = Schemas['Template'];
export type TemplateList = Schemas['TemplateList'];
export type TemplateInput = Schemas['TemplateRequest'];
export type ProxmoxTemplate = Schemas['ProxmoxTemplate'];
export type AgentVm = Schemas['AgentVm'];
export type AgentVmList = Schemas['AgentVmList'];

export type VmNode = Schemas['Node'];
export type NodeStatus = Schemas['NodeStatus'];
export type NodeList = Schemas['NodeList'];
export type NodeWithCommand = Schemas['NodeWithCommand'];
export type CreateNodeRequest = Schemas['CreateNodeRequest'];
export type UpdateNodeRequest = Schemas['UpdateNodeRequest'];
export type ProvisionRequest = Schemas['ProvisionRequest'];
export type CloneOptions = Schemas['CloneOptions'];
export type ImportNodeRequest = Schemas['ImportNodeRequest'];
export type PowerAction = Schemas['PowerAction'];
export type PowerRequest = Schemas['PowerRequest'];
export type DestroyRequest = Schemas['DestroyRequest'];

export type TerraformWorkspace = Schemas['TerraformWorkspace'];
export type TerraformWorkspaceList = Schemas['TerraformWorkspaceList'];
export type TerraformStateVersion = Schemas['TerraformStateVersion'];
export type TerraformStateVersionList = Schemas['TerraformStateVersionList'];

export type ErrorBody = Schemas['ErrorBody'];
export type ErrorDetail = Schemas['ErrorDetail'];

/**
 * Every command status, and whether it is terminal. Exhaustive over the generated
 * `CommandStatus`: a status added to the API fails the typecheck here until it is classified.
 */
export const COMMAND_STATUS_TERMINAL = {
  queued: false,
  dispatched: false,
  running: false,
  succeeded: true,
  failed: true,
  cancelled: true,
  timed_out: true,
} as const satisfies Record<CommandStatus, boolean>;

/** Command statuses in life order (the filter chips on the Commands page). */
export const COMMAND_STATUSES = Object.keys(COMMAND_STATUS_TERMINAL) as CommandStatus[];

export const TERMINAL_STATUSES: CommandStatus[] = COMMAND_STATUSES.filter((s) => COMMAND_STATUS_TERMINAL[s]);

export function isCommandStatus(s: unknown): s is CommandStatus {
  return typeof s === 'string' && Object.hasOwn(COMMAND_STATUS_TERMINAL, s);
}

export function isTerminal(status: CommandStatus | string | null | undefined): boolean {
  return isCommandStatus(status) && COMMAND_STATUS_TERMINAL[status];
}

/** Node statuses with the label shown for each (exhaustive over the generated `NodeStatus`). */
export const NODE_STATUS_LABEL = {
  pending_provision: 'unprovisioned',
  provisioning: 'provisioning',
  running: 'running',
  stopped: 'stopped',
  failed: 'failed',
  destroying: 'destroying',
  destroyed: 'destroyed',
  missing: 'VM missing',
} as const satisfies Record<NodeStatus, string>;

export const NODE_STATUSES = Object.keys(NODE_STATUS_LABEL) as NodeStatus[];

export const AGENT_STATUSES = ['online', 'offline'] as const satisfies readonly AgentStatus[];

// ---- Not described by the OpenAPI document ----

/** Command types (`Command.type` is a plain string in the API). */
export type CommandType =
  | 'ping'
  | 'provision'
  | 'list_templates'
  | 'terraform_apply'
  | 'terraform_plan'
  | 'terraform_destroy'
  | 'vm_power'
  | 'destroy';

export const COMMAND_TYPES: CommandType[] = [
  'provision',
  'vm_power',
  'destroy',
  'terraform_plan',
  'terraform_apply',
  'terraform_destroy',
  'list_templates',
  'ping',
];

/** `Stage.state` (a plain string in the API). */
export type StageState = 'pending' | 'running' | 'completed' | 'failed' | 'skipped';

export type LogStream = 'stdout' | 'stderr' | 'system';

/** The stream of a log line (`stdout` when the server did not say or said something else). */
export function logStream(s: string | null | undefined): LogStream {
  return s === 'stderr' || s === 'system' ? s : 'stdout';
}

/** `Command.error` (typed `unknown` in the API document). */
export interface CommandError {
  code: string;
  message: string;
  retryable?: boolean;
  stage?: string | null;
  details?: unknown;
}

/** A command's error when it has one of the documented shape. */
export function commandError(cmd: { error?: unknown } | null | undefined): CommandError | null {
  const e = cmd?.error;
  if (!e || typeof e !== 'object') return null;
  const r = e as Record<string, unknown>;
  if (typeof r.code !== 'string' && typeof r.message !== 'string') return null;
  return {
    code: typeof r.code === 'string' ? r.code : 'error',
    message: typeof r.message === 'string' ? r.message : '',
    retryable: typeof r.retryable === 'boolean' ? r.retryable : undefined,
    stage: typeof r.stage === 'string' ? r.stage : null,
    details: r.details,
  };
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
