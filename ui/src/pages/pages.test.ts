// The pages read their lists from the shared query cache: rendered (server-side, no DOM) with a
// pre-filled cache, they show its entries without fetching anything.
import { afterEach, describe, expect, it, vi } from 'vitest';
import { createElement, type ReactElement } from 'react';
import { renderToString } from 'react-dom/server';
import { QueryClientProvider, type QueryClient } from '@tanstack/react-query';
import { api } from '../lib/api';
import { createQueryClient, queryKeys } from '../lib/queries';
import type { Agent, Command, Template, VmNode } from '../lib/types';
import { Hypervisors } from './Hypervisors';
import { Nodes } from './Nodes';
import { Templates } from './Templates';
import { Commands } from './Commands';
import { Deploy } from './Deploy';

const agent = { id: 'a1', name: 'pve-cache', status: 'online', capabilities: ['provision', 'terraform_apply', 'terraform_plan', 'terraform_destroy'], facts: {}, lastHeartbeat: null, hostname: 'h', version: null } as unknown as Agent;
const template = { id: 't1', name: 'tpl-cache', memory: 1024, cores: 1, proxmoxTemplateId: 9000, proxmoxNode: null, networkBridge: null, postProvisionCommands: [], system: false } as unknown as Template;
const node = { id: 'n1', name: 'node-cache', templateId: 't1', memory: 1024, cores: 1, vmId: 101, hypervisorId: 'a1', ipAddress: '10.0.0.5', status: 'running', lastCommandId: 'c1', error: null, application: null } as unknown as VmNode;
const command = { id: 'c1234567-0000', agentId: 'a1', type: 'provision', status: 'succeeded', stage: null, percent: 100, attempt: 1, createdAt: '2026-01-01T00:00:00Z', startedAt: null, finishedAt: null, error: null, stages: [] } as unknown as Command;

function render(qc: QueryClient, el: ReactElement): string {
  return renderToString(createElement(QueryClientProvider, { client: qc }, el));
}

function filledClient(): QueryClient {
  const qc = createQueryClient();
  qc.setQueryData(queryKeys.agents, [agent]);
  qc.setQueryData(queryKeys.templates, [template]);
  qc.setQueryData(queryKeys.nodes, [node]);
  qc.setQueryData(queryKeys.commands({ limit: 100 }), [command]);
  qc.setQueryData(queryKeys.command('c1'), { ...command, id: 'c1' });
  qc.setQueryData(queryKeys.terraformWorkspaces, [
    { workspace: '/srv/tf#web', versions: 3, latestVersion: 3, updatedAt: '2026-01-01T00:00:00Z', lockedBy: null },
    { workspace: '/srv/tf#db', versions: 2, latestVersion: 2, updatedAt: '2026-01-01T00:00:00Z', lockedBy: null },
  ]);
  qc.setQueryData(queryKeys.commands({ type: 'terraform_apply', limit: 200 }), [
    { ...command, id: 'tfapply1-0000', type: 'terraform_apply', target: { workspace: '/srv/tf#web', version: 'v2' } },
    // The apply of a destroy plan.
    { ...command, id: 'tfapply2-0000', type: 'terraform_apply', params: { destroy: true, plan_command_id: 'p' }, target: { workspace: '/srv/tf#db', version: 'v1' } },
  ]);
  qc.setQueryData(queryKeys.agentVms('a1'), [
    { vmId: 101, node: 'pve1', name: 'node-cache', status: 'running', tag: 'trellis-command=c1', ipAddresses: ['10.0.0.5'], seenAt: '2026-01-01T00:00:00Z', nodeId: 'n1' },
    { vmId: 102, node: 'pve1', name: 'left-over', status: 'stopped', tag: 'trellis-command=c0', ipAddresses: [], seenAt: '2026-01-01T00:00:00Z', nodeId: null },
    { vmId: 200, node: 'pve1', name: 'hand-made', status: 'running', tag: null, ipAddresses: [], seenAt: '2026-01-01T00:00:00Z', nodeId: null },
  ]);
  return qc;
}

afterEach(() => vi.restoreAllMocks());

describe('pages read the shared cache', () => {
  it('every page shows the cached entries of its keys', () => {
    const qc = filledClient();
    const hv = render(qc, createElement(Hypervisors));
    expect(hv).toContain('data-agent-name="pve-cache"');
    // The VM inventory from ['agentVms', id]: tracked, untracked made by Trellis, foreign.
    expect(hv).toMatch(/data-vmid="101" data-tracking="tracked"/);
    expect(hv).toContain('node node-cache');
    expect(hv).toMatch(/data-vmid="102" data-tracking="untracked-trellis"[\s\S]*untracked — made by Trellis/);
    expect(hv).toMatch(/data-vmid="200" data-tracking="foreign"/);
    const nodes = render(qc, createElement(Nodes, { query: new URLSearchParams() }));
    expect(nodes).toContain('data-node-name="node-cache"');
    expect(nodes).toContain('tpl-cache'); // template name from ['templates']
    expect(nodes).toContain('pve-cache'); // hypervisor name from ['agents']
    expect(nodes).not.toContain('data-busy'); // its last command (['command', 'c1']) succeeded
    expect(render(qc, createElement(Templates))).toContain('data-template-name="tpl-cache"');
    const cmds = render(qc, createElement(Commands, { query: new URLSearchParams() }));
    expect(cmds).toContain('data-command-id="c1234567-0000"');
    expect(cmds).toContain('pve-cache');
    const deploy = render(qc, createElement(Deploy));
    expect(deploy).toMatch(/<option value="a1"[^>]*>pve-cache/);
    // The workspaces from ['terraformWorkspaces'], each with its last apply from the command list.
    expect(deploy).toMatch(/data-workspace="\/srv\/tf#web"[\s\S]*version (<!-- -->)?3[\s\S]*tfapply1[\s\S]*v2/);
    // A destroy plan's apply is marked as one; the web workspace's plain apply is not.
    expect(deploy).toMatch(/data-workspace="\/srv\/tf#db"[\s\S]*tfapply2[\s\S]*\(destroy\)/);
    expect(deploy.split('data-workspace="/srv/tf#db"')[0]).not.toContain('(destroy)');
  });

  it('a hypervisor that never connected shows its install line, without a token', () => {
    const qc = createQueryClient();
    const fresh = { ...agent, id: 'a2', name: 'pve-new', status: 'offline', lastHeartbeat: null, connectedAt: null, version: null, hostname: null } as unknown as Agent;
    qc.setQueryData(queryKeys.agents, [agent, fresh]);
    qc.setQueryData(queryKeys.installInfo, { publicUrl: 'https://trellis.example.com', serverPublicKey: 'KEY=', installCommand: null });
    const html = render(qc, createElement(Hypervisors));
    // Only for the agent that never connected.
    expect(html.match(/data-testid="pending-install"/g)).toHaveLength(1);
    expect(html).toContain('data-testid="pending-install" data-agent-id="a2"');
    expect(html).toContain('curl -fsSL https://trellis.example.com/install/tendril.sh | sh -s -- --server https://trellis.example.com --server-public-key KEY=');
    expect(html).toContain('IFS= read -rs TENDRIL_TOKEN &amp;&amp; curl');
    expect(html).toContain('pveum user token add trellis@pve tendril --privsep 1');
  });

  it('with an empty cache the pages wait for data (spinner), not an empty list', () => {
    vi.spyOn(api, 'listAgents').mockReturnValue(new Promise(() => undefined));
    const html = render(createQueryClient(), createElement(Hypervisors));
    expect(html).not.toContain('No hypervisors yet');
    expect(html).not.toContain('agents-table');
  });
});
