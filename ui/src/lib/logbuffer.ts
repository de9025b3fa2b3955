// Log lines of one command, kept outside React state: chunks are split into lines (a chunk
// without a trailing newline leaves its stream's line open for the next chunk), and
// subscribers are told at most once per animation frame, so fast output does not re-render
// per chunk.
import type { LogStream } from './types';

export interface LogLine {
  stream: LogStream;
  text: string;
  seq: number;
}

export class LogBuffer {
  readonly lines: LogLine[] = [];
  /** Index in `lines` of the open (unterminated) line per stream. */
  private open: Partial<Record<LogStream, number>> = {};
  /** Lines dropped from the front because of `maxLines`. */
  dropped = 0;
  version = 0;
  private listeners = new Set<() => void>();
  private scheduled = false;

  constructor(private readonly maxLines = 200_000) {}

  append(stream: LogStream, data: string, seq: number): void {
    if (!data) return;
    const parts = data.replace(/\r\n/g, '\n').split('\n');
    const endsWithNewline = parts[parts.length - 1] === '';
    if (endsWithNewline) parts.pop();
    const openIdx = this.open[stream];
    let i = 0;
    if (openIdx !== undefined && parts.length > 0) {
      this.lines[openIdx].text += parts[0];
      i = 1;
    }
    for (; i < parts.length; i++) this.lines.push({ stream, text: parts[i], seq });
    if (endsWithNewline) delete this.open[stream];
    else if (parts.length > 0) this.open[stream] = this.lines.length - 1;
    // A chunk on another stream closes the visual continuity of open lines elsewhere only
    // when we add a new line for it; open indexes stay valid until trimming below.
    this.trim();
    this.changed();
  }

  clear(): void {
    this.lines.length = 0;
    this.open = {};
    this.dropped = 0;
    this.changed();
  }

  private trim(): void {
    const excess = this.lines.length - this.maxLines;
    if (excess <= 0) return;
    // Drop in blocks so trimming is rare.
    const n = Math.max(excess, Math.floor(this.maxLines / 10));
    this.lines.splice(0, n);
    this.dropped += n;
    for (const k of Object.keys(this.open) as LogStream[]) {
      const idx = this.open[k]! - n;
      if (idx < 0) delete this.open[k];
      else this.open[k] = idx;
    }
  }

  subscribe(fn: () => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  private changed(): void {
    this.version++;
    if (this.scheduled) return;
    this.scheduled = true;
    const run = () => {
      this.scheduled = false;
      this.listeners.forEach((fn) => fn());
    };
    if (typeof requestAnimationFrame === 'function') requestAnimationFrame(run);
    else setTimeout(run, 16);
  }
}
