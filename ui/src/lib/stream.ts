// Live command stream: Server-Sent Events read with `fetch` (so the Authorization header can
// be sent), resumed with `Last-Event-ID` after a drop, de-duplicated by `seq`, and falling back
// to polling `GET /api/commands/:id` + `/logs?after=SEQ` when SSE does not work.
import { SseParser } from './sse';
import type { Command, CommandEventData, LogPage } from './types';
import { isTerminal, logStream } from './types';

/** Remembers which per-command `seq` numbers were already delivered. */
export class SeqTracker {
  /** Every seq ≤ floor has been seen. */
  private floor = 0;
  private above = new Set<number>();
  private highest = 0;

  /** True the first time a seq is offered, false for a duplicate. */
  accept(seq: number): boolean {
    if (!Number.isFinite(seq)) return true;
    if (seq <= this.floor || this.above.has(seq)) return false;
    this.above.add(seq);
    if (seq > this.highest) this.highest = seq;
    while (this.above.has(this.floor + 1)) {
      this.above.delete(this.floor + 1);
      this.floor++;
    }
    return true;
  }

  /** The seq to resume after (`Last-Event-ID`, `?after=`). */
  get last(): number {
    return this.highest;
  }

  /** Marks everything up to `seq` as seen (e.g. a page of logs loaded before streaming). */
  seenUpTo(seq: number): void {
    if (seq <= this.floor) return;
    for (const s of this.above) if (s <= seq) this.above.delete(s);
    this.floor = seq;
    if (seq > this.highest) this.highest = seq;
  }
}

export type StreamState = 'connecting' | 'live' | 'reconnecting' | 'polling' | 'ended' | 'error';
export type EventKind = 'log' | 'stage' | 'progress' | 'finished';

export interface StreamHandlers {
  /** A command snapshot: from an SSE `status` event (without stages) or a poll (with stages). */
  onCommand?(cmd: Command): void;
  /** A new (not yet seen) event, in arrival order. */
  onEvent?(kind: EventKind, ev: CommandEventData): void;
  /** The command is terminal and everything was delivered. */
  onEnd?(): void;
  onState?(state: StreamState, detail?: string): void;
  /** 401 from the server. */
  onUnauthorized?(): void;
}

export interface StreamOptions {
  commandId: string;
  token: string | null;
  /** Resume after this seq (events up to it are treated as already seen). */
  after?: number;
  fetchImpl?: typeof fetch;
  sleep?: (ms: number, signal: AbortSignal) => Promise<void>;
  /** Consecutive failed SSE attempts before switching to polling. */
  maxSseFailures?: number;
  pollIntervalMs?: number;
  baseUrl?: string;
}

const defaultSleep = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(t);
      resolve();
    });
  });

/** Reconnect delay after `failures` consecutive failures (ms). */
export function backoffMs(failures: number, retryHint: number | null): number {
  const base = retryHint ?? 1000;
  return Math.min(base * 2 ** Math.max(0, failures - 1), 15000);
}

/** Event timestamps arrive as Unix milliseconds or RFC 3339; the UI uses RFC 3339. */
export function normalizeTs(ts: unknown): string | undefined {
  if (typeof ts === 'number' && Number.isFinite(ts)) return new Date(ts).toISOString();
  if (typeof ts === 'string' && /^\d+$/.test(ts)) return new Date(Number(ts)).toISOString();
  return typeof ts === 'string' ? ts : undefined;
}

const EVENT_KINDS = new Set<string>(['log', 'stage', 'progress', 'finished']);

export class CommandStream {
  readonly seqs = new SeqTracker();
  private readonly ctrl = new AbortController();
  private readonly fetchImpl: typeof fetch;
  private readonly sleep: (ms: number, signal: AbortSignal) => Promise<void>;
  private retryHint: number | null = null;
  private ended = false;
  state: StreamState = 'connecting';

  constructor(
    private readonly opts: StreamOptions,
    private readonly h: StreamHandlers,
  ) {
    this.fetchImpl = opts.fetchImpl ?? ((...a) => fetch(...a));
    this.sleep = opts.sleep ?? defaultSleep;
    if (opts.after) this.seqs.seenUpTo(opts.after);
  }

  get stopped(): boolean {
    return this.ctrl.signal.aborted;
  }

  stop(): void {
    this.ctrl.abort();
  }

  private setState(s: StreamState, detail?: string) {
    this.state = s;
    this.h.onState?.(s, detail);
  }

  /** Runs until the command ended, an unrecoverable error, or `stop()`. */
  async run(): Promise<void> {
    const maxFailures = this.opts.maxSseFailures ?? 3;
    let failures = 0;
    let first = true;
    while (!this.stopped) {
      this.setState(first ? 'connecting' : 'reconnecting');
      first = false;
      let outcome: 'ended' | 'dropped' | 'failed' | 'fatal';
      try {
        outcome = await this.connectOnce();
      } catch (e) {
        if (this.stopped) return;
        outcome = 'failed';
        void e;
      }
      if (this.stopped) return;
      if (outcome === 'ended' || outcome === 'fatal') return;
      if (outcome === 'dropped') failures = 0;
      else failures++;
      if (failures >= maxFailures) {
        await this.poll();
        return;
      }
      await this.sleep(backoffMs(Math.max(1, failures), this.retryHint), this.ctrl.signal);
    }
  }

  /**
   * One SSE connection. 'dropped': the stream delivered something and then closed without
   * `end` (reconnect at once-ish); 'failed': nothing usable came back.
   */
  private async connectOnce(): Promise<'ended' | 'dropped' | 'failed' | 'fatal'> {
    const headers: Record<string, string> = { Accept: 'text/event-stream', 'Cache-Control': 'no-cache' };
    if (this.opts.token) headers.Authorization = `Bearer ${this.opts.token}`;
    const last = this.seqs.last;
    if (last > 0) headers['Last-Event-ID'] = String(last);
    const url = `${this.opts.baseUrl ?? ''}/api/commands/${encodeURIComponent(this.opts.commandId)}/events`;
    const res = await this.fetchImpl(url, { headers, signal: this.ctrl.signal, cache: 'no-store' });
    if (res.status === 401) {
      this.setState('error', 'Unauthorized');
      this.h.onUnauthorized?.();
      return 'fatal';
    }
    if (res.status === 404) {
      this.setState('error', 'Command not found');
      return 'fatal';
    }
    const ctype = res.headers.get('content-type') ?? '';
    if (!res.ok || !res.body || !ctype.includes('text/event-stream')) {
      try {
        await res.body?.cancel();
      } catch {
        /* ignore */
      }
      return 'failed';
    }
    let gotAny = false;
    let ended = false;
    const parser = new SseParser((m) => {
      gotAny = true;
      if (m.retry !== null) this.retryHint = m.retry;
      if (ended) return;
      if (m.event === 'end') {
        ended = true;
        return;
      }
      this.handleMessage(m.event, m.data);
    });
    this.setState('live');
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    try {
      while (!ended) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(decoder.decode(value, { stream: true }));
      }
    } catch (e) {
      if (this.stopped) return 'fatal';
      void e;
    } finally {
      if (ended) {
        try {
          await reader.cancel();
        } catch {
          /* ignore */
        }
      }
    }
    parser.push(decoder.decode());
    if (ended) {
      this.finish();
      return 'ended';
    }
    return gotAny ? 'dropped' : 'failed';
  }

  private handleMessage(event: string, data: string): void {
    let parsed: unknown;
    try {
      parsed = JSON.parse(data);
    } catch {
      return;
    }
    if (event === 'status') {
      this.h.onCommand?.(parsed as Command);
      return;
    }
    const kind = EVENT_KINDS.has(event)
      ? (event as EventKind)
      : EVENT_KINDS.has((parsed as CommandEventData)?.kind ?? '')
        ? ((parsed as CommandEventData).kind as EventKind)
        : null;
    if (!kind) return;
    const ev = { ...(parsed as CommandEventData), ts: normalizeTs((parsed as { ts?: unknown }).ts) };
    if (typeof ev.seq === 'number' && !this.seqs.accept(ev.seq)) return;
    this.h.onEvent?.(kind, ev);
  }

  private finish(): void {
    if (this.ended) return;
    this.ended = true;
    this.setState('ended');
    this.h.onEnd?.();
  }

  /** Polling fallback: the command (with stages) and the logs after the last seq. */
  private async poll(): Promise<void> {
    this.setState('polling');
    const interval = this.opts.pollIntervalMs ?? 1500;
    const base = `${this.opts.baseUrl ?? ''}/api/commands/${encodeURIComponent(this.opts.commandId)}`;
    const headers: Record<string, string> = { Accept: 'application/json' };
    if (this.opts.token) headers.Authorization = `Bearer ${this.opts.token}`;
    const get = async <T>(url: string): Promise<T | 'unauthorized' | null> => {
      const res = await this.fetchImpl(url, { headers, signal: this.ctrl.signal, cache: 'no-store' });
      if (res.status === 401) return 'unauthorized';
      if (!res.ok) return null;
      return (await res.json()) as T;
    };
    while (!this.stopped) {
      try {
        const cmd = await get<Command>(base);
        if (cmd === 'unauthorized') {
          this.setState('error', 'Unauthorized');
          this.h.onUnauthorized?.();
          return;
        }
        let logsDone = false;
        // Drain logs page by page.
        for (let page = 0; page < 50 && !this.stopped; page++) {
          const logs = await get<LogPage>(
            `${base}/logs?after=${this.seqs.last}&limit=5000`,
          );
          if (logs === 'unauthorized' || logs === null) break;
          for (const c of logs.items) {
            if (!this.seqs.accept(c.seq)) continue;
            this.h.onEvent?.('log', { seq: c.seq, ts: normalizeTs(c.ts), kind: 'log', stream: logStream(c.stream), data: c.data });
          }
          if (logs.items.length === 0) {
            // Nothing after our last seq: once the command is terminal, that is all of it.
            logsDone = true;
            break;
          }
        }
        if (cmd) {
          this.h.onCommand?.(cmd);
          if (isTerminal(cmd.status) && logsDone) {
            this.finish();
            return;
          }
        }
      } catch (e) {
        if (this.stopped) return;
        void e;
      }
      await this.sleep(interval, this.ctrl.signal);
    }
  }
}
