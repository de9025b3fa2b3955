import { useCallback, useEffect, useState } from 'react';
import { notifyUnauthorized } from './api';
import { CommandStream, type StreamState } from './stream';
import { LogBuffer } from './logbuffer';
import { applyEvent, mergeSnapshot } from './stages';
import type { Command } from './types';
import { isTerminal } from './types';
import { api, errorMessage } from './api';

/** The current time, updated every `ms` (for "12 s ago" labels). */
export function useNow(ms = 1000): number {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(t);
  }, [ms]);
  return now;
}

export interface LiveCommand {
  command: Command | null;
  error: string | null;
  streamState: StreamState;
  logs: LogBuffer;
  /** Re-reads the command (e.g. after cancel). */
  refresh: () => void;
}

/**
 * Loads a command and follows it live: SSE with resume, polling fallback; log chunks go into
 * a LogBuffer, stage/progress/finished events update the command snapshot.
 */
export function useLiveCommand(id: string | null, opts: { logs?: boolean } = {}): LiveCommand {
  const [command, setCommand] = useState<Command | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [streamState, setStreamState] = useState<StreamState>('connecting');
  const [logs, setLogs] = useState(() => new LogBuffer());
  const [refreshTick, setRefreshTick] = useState(0);
  const wantLogs = opts.logs !== false;

  useEffect(() => {
    if (!id) return;
    let alive = true;
    const buffer = new LogBuffer();
    setLogs(buffer);
    setCommand(null);
    setError(null);
    const ctrl = new AbortController();
    let sawTerminal = false;
    const fetchFull = async () => {
      try {
        const c = await api.getCommand(id, ctrl.signal);
        if (alive) setCommand((prev) => mergeSnapshot(prev, c));
      } catch (e) {
        if (alive && !(e instanceof DOMException && e.name === 'AbortError')) setError(errorMessage(e));
      }
    };
    void fetchFull();
    const stream = new CommandStream(
      { commandId: id, token: null },
      {
        onCommand: (c) => {
          if (!alive) return;
          setCommand((prev) => mergeSnapshot(prev, c));
          // Terminal now: read the full command (stages, result) once.
          if (isTerminal(c.status) && !sawTerminal) {
            sawTerminal = true;
            void fetchFull();
          }
        },
        onEvent: (kind, ev) => {
          if (!alive) return;
          if (kind === 'log') {
            if (wantLogs && ev.data) buffer.append(ev.stream ?? 'stdout', ev.data, ev.seq);
            return;
          }
          setCommand((prev) => (prev ? applyEvent(prev, kind, ev) : prev));
          if (kind === 'finished') void fetchFull();
        },
        onEnd: () => {
          if (alive) void fetchFull();
        },
        onState: (s, detail) => {
          if (!alive) return;
          setStreamState(s);
          if (s === 'error' && detail) setError(detail);
        },
        onUnauthorized: () => notifyUnauthorized(),
      },
    );
    void stream.run();
    return () => {
      alive = false;
      ctrl.abort();
      stream.stop();
    };
  }, [id, wantLogs]);

  useEffect(() => {
    if (!id || refreshTick === 0) return;
    const ctrl = new AbortController();
    api
      .getCommand(id, ctrl.signal)
      .then((c) => setCommand((prev) => mergeSnapshot(prev, c)))
      .catch(() => undefined);
    return () => ctrl.abort();
  }, [id, refreshTick]);

  const refresh = useCallback(() => setRefreshTick((t) => t + 1), []);
  return { command, error, streamState, logs, refresh };
}
