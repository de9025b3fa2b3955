// The command page's "Keep (pin)" toggle: its markup (a real button, pressed while pinned,
// described by the visible hint), the requests it makes (PUT/DELETE …/pin with the CSRF
// header every change sends) and the cache keys they invalidate.
import { afterEach, describe, expect, it, vi } from 'vitest';
import { createElement } from 'react';
import { renderToString } from 'react-dom/server';
import { api } from '../lib/api';
import { createQueryClient, mutations } from '../lib/queries';
import type { Command } from '../lib/types';
import { PinToggle } from './PinToggle';

afterEach(() => {
  vi.restoreAllMocks();
  vi.unstubAllGlobals();
});

const render = (pinned: boolean, busy = false) => renderToString(createElement(PinToggle, { pinned, busy, onToggle: () => undefined }));

describe('PinToggle', () => {
  it('is a real toggle button with a visible label that does not change with its state', () => {
    const off = render(false);
    expect(off).toMatch(/<button type="button"[^>]*aria-pressed="false"[^>]*>Keep \(pin\)<\/button>/);
    expect(off).toContain('Deleted with its log once past the retention period.');
    const on = render(true);
    expect(on).toMatch(/<button type="button"[^>]*aria-pressed="true"[^>]*>Keep \(pin\)<\/button>/);
    expect(on).toContain('Pinned: kept past the retention period.');
    expect(on).not.toContain('disabled');
    expect(render(true, true)).toMatch(/<button[^>]*disabled=""/);
  });

  it('the hint is the button’s description', () => {
    const html = render(true);
    const described = /aria-describedby="([^"]+)"/.exec(html)?.[1];
    expect(described).toBeTruthy();
    expect(html).toContain(`id="${described}"`);
  });
});

describe('pin requests', () => {
  it('PUT pins and DELETE unpins, with the CSRF header, and answer the command', async () => {
    const cmd = { id: 'c/1', pinned: true } as Command;
    const fetchMock = vi.fn(async () => new Response(JSON.stringify(cmd), { status: 200, headers: { 'content-type': 'application/json' } }));
    vi.stubGlobal('fetch', fetchMock);
    await expect(api.pinCommand('c/1')).resolves.toEqual(cmd);
    await api.unpinCommand('c/1');
    const calls = fetchMock.mock.calls as unknown as [string, RequestInit][];
    expect(calls.map(([url, init]) => [url, init.method])).toEqual([
      ['/api/commands/c%2F1/pin', 'PUT'],
      ['/api/commands/c%2F1/pin', 'DELETE'],
    ]);
    for (const [, init] of calls) expect(init.headers).toMatchObject({ 'X-Trellis-Request': '1' });
  });

  it('an unknown command is an ApiError with the server’s code', async () => {
    vi.stubGlobal(
      'fetch',
      vi.fn(async () => new Response(JSON.stringify({ error: { code: 'not_found', message: 'command x not found' } }), { status: 404 })),
    );
    await expect(api.pinCommand('x')).rejects.toMatchObject({ status: 404, code: 'not_found' });
  });

  it('pinning and unpinning refresh the command and the lists', async () => {
    const qc = createQueryClient();
    const keys = vi.spyOn(qc, 'invalidateQueries');
    const pin = vi.spyOn(api, 'pinCommand').mockResolvedValue({ id: 'c1', pinned: true } as Command);
    const unpin = vi.spyOn(api, 'unpinCommand').mockResolvedValue({ id: 'c1', pinned: false } as Command);
    const m = mutations(qc);
    await expect(m.pinCommand('c1')).resolves.toMatchObject({ pinned: true });
    await m.unpinCommand('c1');
    expect(pin).toHaveBeenCalledWith('c1');
    expect(unpin).toHaveBeenCalledWith('c1');
    expect(keys.mock.calls.map(([f]) => f?.queryKey)).toEqual([['commands'], ['command', 'c1'], ['commands'], ['command', 'c1']]);
  });
});
