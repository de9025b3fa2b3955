// Shared server state: one TanStack Query cache, one key per resource, one refetch interval.
// Every page that shows agents reads the same ['agents'] entry, so the list is fetched once per
// interval however many components show it. Mutations go through `mutations()` below, which
// invalidates the keys a change affects. Live command progress stays on SSE (hooks.ts).
import {
  QueryClient,
  keepPreviousData,
  queryOptions,
  useQueries,
  useQuery,
  useQueryClient,
  type QueryKey,
} from '@tanstack/react-query';
import { useMemo } from 'react';
import { api } from './api';
import type { Command, CommandStatus, PowerRequest, TemplateInput, VmNode } from './types';
import { isTerminal } from './types';

/** How often every list refreshes while a component shows it (and the tab is visible). */
export const POLL_MS = 3000;

export interface CommandFilters {
  status?: CommandStatus | '';
  type?: string;
  agentId?: string;
  limit?: number;
}

export const queryKeys = {
  agents: ['agents'] as const,
  installInfo: ['installInfo'] as const,
  templates: ['templates'] as const,
  nodes: ['nodes'] as const,
  node: (id: string) => ['node', id] as const,
  /** Prefix of every command list, whatever its filters. */
  commandLists: ['commands'] as const,
  commands: (f: CommandFilters) => ['commands', f] as const,
  command: (id: string) => ['command', id] as const,
  /** A hypervisor's latest VM inventory (GET /api/agents/{id}/vms). */
  agentVms: (agentId: string) => ['agentVms', agentId] as const,
  /** Prefix of every hypervisor's VM inventory. */
  allAgentVms: ['agentVms'] as const,
  /** Terraform workspaces with stored state, and one workspace's state versions. */
  terraformWorkspaces: ['terraformWorkspaces'] as const,
  terraformVersions: (workspace: string) => ['terraformVersions', workspace] as const,
  /** Prefix of every workspace's versions. */
  allTerraformVersions: ['terraformVersions'] as const,
};

/** The app's query client. Lists poll, so failed requests are not retried in between. */
export function createQueryClient(): QueryClient {
  return new QueryClient({
    defaultOptions: {
      queries: {
        retry: false,
        staleTime: 1000,
        refetchIntervalInBackground: false,
      },
      mutations: { retry: false },
    },
  });
}

export const agentsQuery = () =>
  queryOptions({
    queryKey: queryKeys.agents,
    queryFn: ({ signal }) => api.listAgents(signal).then((r) => r.items),
    refetchInterval: POLL_MS,
  });

export const templatesQuery = () =>
  queryOptions({
    queryKey: queryKeys.templates,
    queryFn: ({ signal }) => api.listTemplates(signal).then((r) => r.items),
    refetchInterval: POLL_MS,
  });

export const nodesQuery = () =>
  queryOptions({
    queryKey: queryKeys.nodes,
    queryFn: ({ signal }) => api.listNodes(signal).then((r) => r.items),
    refetchInterval: POLL_MS,
  });

export const agentVmsQuery = (agentId: string) =>
  queryOptions({
    queryKey: queryKeys.agentVms(agentId),
    queryFn: ({ signal }) => api.agentVms(agentId, signal).then((r) => r.items),
    refetchInterval: POLL_MS,
  });

/**
 * One command by id, polled while it runs; a terminal command never changes, so it is read
 * once. Shared with every component showing that command's status (['command', id]).
 */
export const commandQuery = (id: string) =>
  queryOptions({
    queryKey: queryKeys.command(id),
    queryFn: ({ signal }) => api.getCommand(id, signal),
    refetchInterval: (q) => (q.state.data && isTerminal(q.state.data.status) ? false : POLL_MS),
    staleTime: (q) => (q.state.data && isTerminal(q.state.data.status) ? Infinity : 1000),
  });

/** Empty filter values are dropped so equal filters share one cache entry. */
export function normalizeFilters(f: CommandFilters): CommandFilters {
  const out: CommandFilters = {};
  if (f.status) out.status = f.status;
  if (f.type) out.type = f.type;
  if (f.agentId) out.agentId = f.agentId;
  if (f.limit) out.limit = f.limit;
  return out;
}

export const commandsQuery = (filters: CommandFilters, auto = true) => {
  const f = normalizeFilters(filters);
  return queryOptions<Command[], Error, Command[], ReturnType<typeof queryKeys.commands>>({
    queryKey: queryKeys.commands(f),
    queryFn: ({ signal }) => api.listCommands(f, signal).then((r) => r.items),
    refetchInterval: auto ? POLL_MS : false,
    // Changing a filter keeps the old rows on screen until the new ones arrive.
    placeholderData: keepPreviousData,
  });
};

export const terraformWorkspacesQuery = () =>
  queryOptions({
    queryKey: queryKeys.terraformWorkspaces,
    queryFn: ({ signal }) => api.terraformWorkspaces(signal).then((r) => r.items),
    refetchInterval: POLL_MS,
  });

export const terraformVersionsQuery = (workspace: string, enabled = true) =>
  queryOptions({
    queryKey: queryKeys.terraformVersions(workspace),
    queryFn: ({ signal }) => api.terraformVersions(workspace, signal).then((r) => r.items),
    refetchInterval: POLL_MS,
    enabled,
  });

/** The public URL and signing key for install lines: fixed while trellis runs, read once. */
export const installInfoQuery = () =>
  queryOptions({
    queryKey: queryKeys.installInfo,
    queryFn: ({ signal }) => api.installInfo(signal),
    staleTime: Infinity,
  });

export const useAgents = () => useQuery(agentsQuery());
export const useInstallInfo = () => useQuery(installInfoQuery());
export const useTemplates = () => useQuery(templatesQuery());
export const useNodes = () => useQuery(nodesQuery());
export const useCommands = (filters: CommandFilters, auto = true) => useQuery(commandsQuery(filters, auto));
export const useAgentVms = (agentId: string) => useQuery(agentVmsQuery(agentId));

/** The commands with these ids (e.g. each node's last command), by id; missing while loading. */
export function useCommandsById(ids: string[]): Map<string, Command> {
  const unique = [...new Set(ids)].sort();
  return useQueries({
    queries: unique.map((id) => commandQuery(id)),
    combine: (results) => {
      const m = new Map<string, Command>();
      results.forEach((r) => {
        if (r.data) m.set(r.data.id, r.data);
      });
      return m;
    },
  });
}

/** One agent out of the shared agent list (e.g. to name a command's hypervisor). */
export function useAgent(id: string | null | undefined) {
  const agents = useAgents();
  return id ? agents.data?.find((a) => a.id === id) : undefined;
}

/** The API calls that change server state, each invalidating the keys it affects. */
export function mutations(qc: QueryClient) {
  const invalidate = (...keys: QueryKey[]) => {
    for (const queryKey of keys) void qc.invalidateQueries({ queryKey });
  };
  const after =
    <A extends unknown[], R>(fn: (...args: A) => Promise<R>, keys: (...args: A) => QueryKey[]) =>
    async (...args: A): Promise<R> => {
      const r = await fn(...args);
      invalidate(...keys(...args));
      return r;
    };
  const nodeKeys = (id: string) => [queryKeys.nodes, queryKeys.node(id)];
  /** Puts the node a lifecycle request answered into the cached list at once (before the refetch). */
  const putNode = (node: VmNode | null, removeId?: string) =>
    qc.setQueryData<VmNode[]>(queryKeys.nodes, (list) =>
      list && (removeId ? list.filter((n) => n.id !== removeId) : list.map((n) => (node && n.id === node.id ? node : n))),
    );
  const withNode =
    <A extends unknown[], R extends { node: VmNode }>(fn: (...args: A) => Promise<R>) =>
    async (...args: A): Promise<R> => {
      const r = await fn(...args);
      putNode(r.node);
      return r;
    };
  return {
    createAgent: after(api.createAgent, () => [queryKeys.agents]),
    rotateAgentToken: after(api.rotateAgentToken, () => [queryKeys.agents]),
    deleteAgent: after(api.deleteAgent, () => [queryKeys.agents, queryKeys.commandLists]),

    createTemplate: after(api.createTemplate, () => [queryKeys.templates]),
    updateTemplate: after((id: string, t: TemplateInput) => api.updateTemplate(id, t), () => [queryKeys.templates]),
    deleteTemplate: after(api.deleteTemplate, () => [queryKeys.templates]),

    createNode: after(api.createNode, (body) => (body.provision ? [queryKeys.nodes, queryKeys.commandLists] : [queryKeys.nodes])),
    updateNode: after(api.updateNode, (id) => nodeKeys(id)),
    deleteNode: after(api.deleteNode, (id) => nodeKeys(id)),
    provisionNode: after(api.provisionNode, (id) => [...nodeKeys(id), queryKeys.commandLists]),
    powerNode: after(
      withNode((id: string, body: PowerRequest) => api.powerNode(id, body)),
      (id) => [...nodeKeys(id), queryKeys.commandLists],
    ),
    destroyNode: after(withNode(api.destroyNode), (id) => [...nodeKeys(id), queryKeys.commandLists, queryKeys.allAgentVms]),
    forgetNode: after(
      async (id: string) => {
        const n = await api.forgetNode(id);
        putNode(null, id);
        return n;
      },
      (id) => [...nodeKeys(id), queryKeys.allAgentVms],
    ),

    importNode: after(api.importNode, () => [queryKeys.nodes, queryKeys.allAgentVms]),

    createCommand: after(api.createCommand, (body) =>
      body.type.startsWith('terraform_')
        ? [queryKeys.commandLists, queryKeys.terraformWorkspaces, queryKeys.allTerraformVersions]
        : [queryKeys.commandLists],
    ),
    cancelCommand: after(api.cancelCommand, (id) => [queryKeys.commandLists, queryKeys.command(id)]),
    retryCommand: after(api.retryCommand, (id) => [queryKeys.commandLists, queryKeys.command(id), queryKeys.nodes]),
    pinCommand: after(api.pinCommand, (id) => [queryKeys.commandLists, queryKeys.command(id)]),
    unpinCommand: after(api.unpinCommand, (id) => [queryKeys.commandLists, queryKeys.command(id)]),
  };
}

export type Mutations = ReturnType<typeof mutations>;

/** `mutations()` bound to the app's query client. */
export function useMutations(): Mutations {
  const qc = useQueryClient();
  return useMemo(() => mutations(qc), [qc]);
}

/**
 * After a provision command ended, the control plane updates its node: follow the node every
 * second (at most ~20 reads) until it leaves `provisioning`. Keyed under ['node', id] per
 * command, so a retried command starts a fresh follow-up.
 */
export const NODE_FOLLOW_MAX_READS = 21;
export const nodeAfterCommandQuery = (nodeId: string, commandId: string, enabled: boolean) =>
  queryOptions({
    queryKey: [...queryKeys.node(nodeId), { after: commandId }] as const,
    queryFn: ({ signal }) => api.getNode(nodeId, signal),
    enabled,
    staleTime: 0,
    refetchInterval: (q) =>
      q.state.data?.status === 'provisioning' && q.state.dataUpdateCount < NODE_FOLLOW_MAX_READS ? 1000 : false,
  });

/** Whether the follow-up above is done (the node left `provisioning`, or it gave up). */
export function nodeSettled(node: VmNode | undefined, reads: number): boolean {
  return !!node && (node.status !== 'provisioning' || reads >= NODE_FOLLOW_MAX_READS);
}
