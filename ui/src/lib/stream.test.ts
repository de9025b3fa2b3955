import { describe, expect, it } from 'vitest';
import { CommandStream, SeqTracker, backoffMs, normalizeTs, type EventKind } from './stream';
import type { Command, CommandEventData } from './types';

describe('SeqTracker', () => {
  it('accepts each seq once, in any order', () => {
    const t = new SeqTracker();
    expect(t.accept(1)).toBe(true);
    expect(t.accept(1)).toBe(false);
    expect(t.accept(3)).toBe(true);
    expect(t.accept(2)).toBe(true);
    expect(t.accept(3)).toBe(false);
    expect(t.accept(2)).toBe(false);
    expect(t.last).toBe(3);
  });

  it('treats seenUpTo as already delivered', () => {
    const t = new SeqTracker();
    t.accept(12);
    t.seenUpTo(10);
    expect(t.accept(9)).toBe(false);
    expect(t.accept(11)).toBe(true);
    expect(t.accept(12)).toBe(false);
    expect(t.last).toBe(12);
  });
});

describe('backoffMs', () => {
  it('doubles up to a cap and honours the retry hint', () => {
    expect(backoffMs(1, null)).toBe(1000);
    expect(backoffMs(2, null)).toBe(2000);
    expect(backoffMs(10, null)).toBe(15000);
    expect(backoffMs(1, 300)).toBe(300);
  });
});

describe('normalizeTs', () => {
  it('turns unix ms into RFC 3339 and keeps strings', () => {
    expect(normalizeTs(0)).toBe('1970-01-01T00:00:00.000Z');
    expect(normalizeTs('2026-11-25T09:41:07.123Z')).toBe('2026-11-25T09:41:07.123Z');
    expect(normalizeTs(undefined)).toBeUndefined();
  });
});

// ---- a scripted fake server --------------------------------------------------------

type Reply = { status?: number; ctype?: string; body?: string[]; error?: boolean; json?: unknown };

function sseBody(chunks: string[]): ReadableStream<Uint8Array> {
  const enc = new TextEncoder();
  let i = 0;
  return new ReadableStream({
    pull(ctrl) {
      if (i < chunks.length) ctrl.enqueue(enc.encode(chunks[i++]));
      else ctrl.close();
    },
  });
}

function fakeFetch(script: (url: string, headers: Record<string, string>) => Reply) {
  const calls: { url: string; headers: Record<string, string> }[] = [];
  const impl = (async (input: RequestInfo | URL, init?: RequestInit) => {
    const url = String(input);
    const headers = (init?.headers ?? {}) as Record<string, string>;
    calls.push({ url, headers });
    const r = script(url, headers);
    if (r.error) throw new TypeError('network down');
    if (r.json !== undefined) {
      return new Response(JSON.stringify(r.json), { status: r.status ?? 200, headers: { 'content-type': 'application/json' } });
    }
    return new Response(sseBody(r.body ?? []), {
      status: r.status ?? 200,
      headers: { 'content-type': r.ctype ?? 'text/event-stream' },
    });
  }) as typeof fetch;
  return { impl, calls };
}

const ev = (kind: string, seq: number, data: object = {}) =>
  `event: ${kind}\nid: ${seq}\ndata: ${JSON.stringify({ seq, ts: 1764063667123, kind, ...data })}\n\n`;
const status = (s: string) => `event: status\ndata: ${JSON.stringify({ id: 'c1', status: s })}\n\n`;

function collect() {
  const events: [EventKind, CommandEventData][] = [];
  const commands: Partial<Command>[] = [];
  const states: string[] = [];
  let ended = 0;
  let unauthorized = 0;
  return {
    events,
    commands,
    states,
    get ended() {
      return ended;
    },
    get unauthorized() {
      return unauthorized;
    },
    handlers: {
      onEvent: (k: EventKind, e: CommandEventData) => events.push([k, e]),
      onCommand: (c: Command) => commands.push(c),
      onState: (s: string) => states.push(s),
      onEnd: () => ended++,
      onUnauthorized: () => unauthorized++,
    },
  };
}

const noSleep = async () => undefined;

describe('CommandStream', () => {
  it('streams events, sends the bearer token and stops at end', async () => {
    const { impl, calls } = fakeFetch(() => ({
      body: [status('running'), ev('stage', 1, { stage: 'clone_template', state: 'running' }), ev('log', 2, { stream: 'stdout', data: 'hi\n' }), 'event: end\ndata: {}\n\n'],
    }));
    const c = collect();
    await new CommandStream({ commandId: 'c1', token: 'tok', fetchImpl: impl, sleep: noSleep }, c.handlers).run();
    expect(calls).toHaveLength(1);
    expect(calls[0].url).toBe('/api/commands/c1/events');
    expect(calls[0].headers.Authorization).toBe('Bearer tok');
    expect(calls[0].headers['Last-Event-ID']).toBeUndefined();
    expect(c.commands.map((x) => x.status)).toEqual(['running']);
    expect(c.events.map(([k, e]) => [k, e.seq])).toEqual([
      ['stage', 1],
      ['log', 2],
    ]);
    expect(c.events[0][1].ts).toBe(new Date(1764063667123).toISOString());
    expect(c.ended).toBe(1);
    expect(c.states.at(-1)).toBe('ended');
  });

  it('reconnects with Last-Event-ID after a drop and drops duplicate seqs', async () => {
    let n = 0;
    const { impl, calls } = fakeFetch(() => {
      n++;
      if (n === 1) return { body: [ev('log', 1, { data: 'a' }), ev('log', 2, { data: 'b' })] }; // closes without end
      if (n === 2) return { error: true }; // network error
      // The server replays seq 2 (overlap) before new events.
      return { body: [status('running'), ev('log', 2, { data: 'b' }), ev('log', 3, { data: 'c' }), 'event: end\ndata: {}\n\n'] };
    });
    const c = collect();
    await new CommandStream({ commandId: 'c1', token: 't', fetchImpl: impl, sleep: noSleep }, c.handlers).run();
    expect(calls.map((x) => x.headers['Last-Event-ID'])).toEqual([undefined, '2', '2']);
    expect(c.events.map(([, e]) => e.data)).toEqual(['a', 'b', 'c']);
    expect(c.states).toContain('reconnecting');
    expect(c.ended).toBe(1);
  });

  it('resumes after a given seq', async () => {
    const { impl, calls } = fakeFetch(() => ({ body: [ev('log', 5), ev('log', 6), 'event: end\n\n'] }));
    const c = collect();
    await new CommandStream({ commandId: 'c1', token: null, after: 5, fetchImpl: impl, sleep: noSleep }, c.handlers).run();
    expect(calls[0].headers['Last-Event-ID']).toBe('5');
    expect(calls[0].headers.Authorization).toBeUndefined();
    expect(c.events.map(([, e]) => e.seq)).toEqual([6]);
  });

  it('reports 401 and stops', async () => {
    const { impl, calls } = fakeFetch(() => ({ status: 401, json: { error: { code: 'unauthorized', message: 'no' } } }));
    const c = collect();
    await new CommandStream({ commandId: 'c1', token: 'bad', fetchImpl: impl, sleep: noSleep }, c.handlers).run();
    expect(calls).toHaveLength(1);
    expect(c.unauthorized).toBe(1);
    expect(c.states.at(-1)).toBe('error');
  });

  it('falls back to polling command + logs when SSE keeps failing', async () => {
    let logPolls = 0;
    let cmdPolls = 0;
    const { impl, calls } = fakeFetch((url) => {
      if (url.endsWith('/events')) return { status: 200, ctype: 'text/html', body: ['<html>'] };
      if (url.includes('/logs?')) {
        logPolls++;
        const after = Number(new URL(url, 'http://x').searchParams.get('after'));
        const all = [
          { seq: 1, ts: 1, stream: 'stdout', data: 'one\n' },
          { seq: 3, ts: 2, stream: 'stderr', data: 'two\n' },
        ];
        const items = all.filter((i) => i.seq > after);
        return { json: { items, lastSeq: items.at(-1)?.seq ?? after, done: cmdPolls >= 2 && items.length === 0 } };
      }
      cmdPolls++;
      return { json: { id: 'c1', status: cmdPolls >= 2 ? 'succeeded' : 'running', stages: [] } };
    });
    const c = collect();
    await new CommandStream({ commandId: 'c1', token: 't', fetchImpl: impl, sleep: noSleep, maxSseFailures: 2 }, c.handlers).run();
    expect(calls.filter((x) => x.url.endsWith('/events'))).toHaveLength(2);
    expect(c.states).toContain('polling');
    expect(c.events.map(([, e]) => e.data)).toEqual(['one\n', 'two\n']);
    expect(c.commands.at(-1)?.status).toBe('succeeded');
    expect(c.ended).toBe(1);
    expect(logPolls).toBeGreaterThan(1);
    expect(calls.some((x) => x.url.includes('/logs?after=3'))).toBe(true);
  });

  it('stop() ends a stream that is waiting', async () => {
    let n = 0;
    const { impl } = fakeFetch(() => {
      n++;
      return { error: true };
    });
    const c = collect();
    const s = new CommandStream(
      { commandId: 'c1', token: 't', fetchImpl: impl, sleep: (_ms, sig) => new Promise((r) => sig.addEventListener('abort', () => r())) },
      c.handlers,
    );
    const p = s.run();
    await new Promise((r) => setTimeout(r, 10));
    s.stop();
    await p;
    expect(n).toBe(1);
    expect(c.ended).toBe(0);
  });
});
