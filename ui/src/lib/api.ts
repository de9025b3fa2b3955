// Thin client for the Trellis HTTP API. The browser is signed in with the HttpOnly session
// cookie that `POST /api/session` sets: no script in the page ever holds the admin token, and
// a link opened in a new tab is signed in too. Every call sends the cookie (same origin) and
// the `X-Trellis-Request` header the server requires of cookie-authenticated changes (a
// cross-site form cannot send it); a 401 anywhere signs the user out (see `onUnauthorized`).
import type {
  AuditList,
  SessionInfo,
  Agent,
  AgentList,
  AgentTemplates,
  AgentVmList,
  Command,
  CommandAccepted,
  CommandList,
  CommandStatus,
  CreateAgentRequest,
  CreateCommandRequest,
  CreateNodeRequest,
  CreatedAgent,
  DestroyRequest,
  ImportNodeRequest,
  InstallInfo,
  ErrorBody,
  LogPage,
  NewToken,
  NodeList,
  NodeWithCommand,
  PowerRequest,
  ProvisionRequest,
  Template,
  TemplateInput,
  TemplateList,
  TerraformStateVersionList,
  TerraformWorkspaceList,
  UpdateNodeRequest,
  VmNode,
} from './types';

type Listener = () => void;
const unauthorizedListeners = new Set<Listener>();

/** Called whenever the API answers 401 (the session ended or was never there). */
export function onUnauthorized(fn: Listener): () => void {
  unauthorizedListeners.add(fn);
  return () => unauthorizedListeners.delete(fn);
}

export function notifyUnauthorized(): void {
  unauthorizedListeners.forEach((fn) => fn());
}

export class ApiError extends Error {
  readonly status: number;
  readonly code: string;
  constructor(status: number, code: string, message: string) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
  }
}

/** Turns any thrown value into a short human message. */
export function errorMessage(e: unknown): string {
  if (e instanceof ApiError) return e.code ? `${e.message} (${e.code})` : e.message;
  if (e instanceof Error) return e.message;
  return String(e);
}

export interface RequestOptions {
  method?: string;
  body?: unknown;
  signal?: AbortSignal;
  /** A 401 is an answer, not a signal to sign out (the sign-in and who-am-I calls). */
  quiet401?: boolean;
}

export async function request<T>(path: string, opts: RequestOptions = {}): Promise<T> {
  const headers: Record<string, string> = { Accept: 'application/json', 'X-Trellis-Request': '1' };
  if (opts.body !== undefined) headers['Content-Type'] = 'application/json';
  let res: Response;
  try {
    res = await fetch(path, {
      method: opts.method ?? 'GET',
      headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      signal: opts.signal,
      credentials: 'same-origin',
    });
  } catch (e) {
    if (e instanceof DOMException && e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network_error', 'Cannot reach the Trellis server');
  }
  if (res.status === 204) return undefined as T;
  const text = await res.text();
  let json: unknown = undefined;
  if (text) {
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
  }
  if (!res.ok) {
    const err = (json as Partial<ErrorBody> | undefined)?.error as Partial<ErrorBody['error']> | undefined;
    const apiErr = new ApiError(
      res.status,
      err?.code ?? `http_${res.status}`,
      err?.message ?? (text.slice(0, 200) || `${res.status} ${res.statusText}`),
    );
    if (res.status === 401 && !opts.quiet401) notifyUnauthorized();
    throw apiErr;
  }
  return json as T;
}

function qs(params: Record<string, string | number | undefined | null>): string {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') u.set(k, String(v));
  }
  const s = u.toString();
  return s ? `?${s}` : '';
}

const enc = encodeURIComponent;

export const api = {
  /** Exchanges an admin token for the session cookie; the token is not kept. */
  signIn: (token: string) =>
    request<SessionInfo>('/api/session', { method: 'POST', body: { token }, quiet401: true }),
  /** Who is signed in; 401 when nobody. */
  session: () => request<SessionInfo>('/api/session', { quiet401: true }),
  signOut: () => request<void>('/api/session', { method: 'DELETE', quiet401: true }),
  listAudit: (
    f: { actor?: string; action?: string; outcome?: string; targetId?: string; limit?: number; before?: string },
    signal?: AbortSignal,
  ) => request<AuditList>(`/api/audit${qs({ ...f })}`, { signal }),

  listAgents: (signal?: AbortSignal) => request<AgentList>('/api/agents', { signal }),
  getAgent: (id: string) => request<Agent>(`/api/agents/${enc(id)}`),
  createAgent: (name: string, maxConcurrency?: number) =>
    request<CreatedAgent>('/api/agents', {
      method: 'POST',
      body: (maxConcurrency ? { name, maxConcurrency } : { name }) satisfies CreateAgentRequest,
    }),
  /** What an agent's install line needs besides its token (public URL, signing key). */
  installInfo: (signal?: AbortSignal) => request<InstallInfo>('/api/agents/install', { signal }),
  rotateAgentToken: (id: string) => request<NewToken>(`/api/agents/${enc(id)}/rotate-token`, { method: 'POST' }),
  deleteAgent: (id: string) => request<void>(`/api/agents/${enc(id)}`, { method: 'DELETE' }),
  agentTemplates: (id: string, signal?: AbortSignal) =>
    request<AgentTemplates>(`/api/agents/${enc(id)}/templates`, { signal }),
  agentVms: (id: string, signal?: AbortSignal) => request<AgentVmList>(`/api/agents/${enc(id)}/vms`, { signal }),

  listCommands: (
    f: { agentId?: string; status?: CommandStatus | ''; type?: string; limit?: number; before?: string },
    signal?: AbortSignal,
  ) => request<CommandList>(`/api/commands${qs({ ...f })}`, { signal }),
  getCommand: (id: string, signal?: AbortSignal) => request<Command>(`/api/commands/${enc(id)}`, { signal }),
  createCommand: (body: CreateCommandRequest) =>
    request<CommandAccepted>('/api/commands', { method: 'POST', body }),
  commandLogs: (id: string, after: number, limit = 5000, signal?: AbortSignal) =>
    request<LogPage>(`/api/commands/${enc(id)}/logs${qs({ after, limit })}`, { signal }),
  cancelCommand: (id: string) => request<Command>(`/api/commands/${enc(id)}/cancel`, { method: 'POST' }),
  retryCommand: (id: string) => request<CommandAccepted>(`/api/commands/${enc(id)}/retry`, { method: 'POST' }),
  /** Keep a command past the retention period (`PUT …/pin`), or let it go (`DELETE …/pin`). */
  pinCommand: (id: string) => request<Command>(`/api/commands/${enc(id)}/pin`, { method: 'PUT' }),
  unpinCommand: (id: string) => request<Command>(`/api/commands/${enc(id)}/pin`, { method: 'DELETE' }),

  listTemplates: (signal?: AbortSignal) => request<TemplateList>('/api/templates', { signal }),
  createTemplate: (t: TemplateInput) => request<Template>('/api/templates', { method: 'POST', body: t }),
  updateTemplate: (id: string, t: TemplateInput) =>
    request<Template>(`/api/templates/${enc(id)}`, { method: 'PUT', body: t }),
  deleteTemplate: (id: string) => request<void>(`/api/templates/${enc(id)}`, { method: 'DELETE' }),

  listNodes: (signal?: AbortSignal) => request<NodeList>('/api/nodes', { signal }),
  getNode: (id: string, signal?: AbortSignal) => request<VmNode>(`/api/nodes/${enc(id)}`, { signal }),
  createNode: (body: CreateNodeRequest) => request<NodeWithCommand>('/api/nodes', { method: 'POST', body }),
  updateNode: (id: string, body: UpdateNodeRequest) =>
    request<VmNode>(`/api/nodes/${enc(id)}`, { method: 'PUT', body }),
  deleteNode: (id: string) => request<void>(`/api/nodes/${enc(id)}`, { method: 'DELETE' }),
  provisionNode: (id: string, body: ProvisionRequest) =>
    request<NodeWithCommand>(`/api/nodes/${enc(id)}/provision`, { method: 'POST', body }),
  powerNode: (id: string, body: PowerRequest) =>
    request<NodeWithCommand>(`/api/nodes/${enc(id)}/power`, { method: 'POST', body }),
  destroyNode: (id: string, confirmName: string) =>
    request<NodeWithCommand>(`/api/nodes/${enc(id)}/destroy`, { method: 'POST', body: { confirmName } satisfies DestroyRequest }),
  forgetNode: (id: string) => request<VmNode>(`/api/nodes/${enc(id)}/forget`, { method: 'POST' }),
  importNode: (body: ImportNodeRequest) => request<VmNode>('/api/nodes/import', { method: 'POST', body }),

  /** Workspaces whose Terraform state trellis keeps. */
  terraformWorkspaces: (signal?: AbortSignal) => request<TerraformWorkspaceList>('/api/terraform/workspaces', { signal }),
  /** The stored state versions of a workspace, newest first (404 when none). */
  terraformVersions: (workspace: string, signal?: AbortSignal) =>
    request<TerraformStateVersionList>(`/api/terraform/state/${enc(workspace)}/versions`, { signal }),
};
