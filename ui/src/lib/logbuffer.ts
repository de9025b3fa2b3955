// Log lines of one command, kept outside React state: chunks are split into lines (a chunk
// without a trailing newline leaves its stream's line open for the next chunk), and
// subscribers are told at most once per animation frame, so fast output does not re-render
// per chunk.
//
// `LogView` is what the viewer shows of a buffer: the stream filter, the search matches and
// the wrapped-line layout. It is kept up to date incrementally (once per frame, only the lines
// added since — plus the few lines still open — are looked at), so a 200 000-line log does not
// cost O(n) per appended line; only changing the filter or the search text scans everything.
import type { LogStream } from './types';

export interface LogLine {
  stream: LogStream;
  text: string;
  seq: number;
}

export const LOG_STREAMS: readonly LogStream[] = ['stdout', 'stderr', 'system'];

/** Lines a buffer keeps before it drops the oldest (a 200 000-line log is kept whole). */
export const MAX_LOG_LINES = 1_000_000;
/** Characters a buffer keeps (UTF-16: about 256 MB) before it drops the oldest lines. */
export const MAX_LOG_CHARS = 128 * 1024 * 1024;

export class LogBuffer {
  readonly lines: LogLine[] = [];
  /** Index in `lines` of the open (unterminated) line per stream. */
  private open: Partial<Record<LogStream, number>> = {};
  /** Lines dropped from the front because of `maxLines`. */
  dropped = 0;
  version = 0;
  /** Bumped by `clear()`: views built before must start over. */
  generation = 0;
  private listeners = new Set<() => void>();
  private scheduled = false;

  /** Characters of the lines kept. */
  private chars = 0;

  constructor(
    private readonly maxLines = MAX_LOG_LINES,
    private readonly maxChars = MAX_LOG_CHARS,
  ) {}

  append(stream: LogStream, data: string, seq: number): void {
    if (!data) return;
    const parts = data.replace(/\r\n/g, '\n').split('\n');
    const endsWithNewline = parts[parts.length - 1] === '';
    if (endsWithNewline) parts.pop();
    const openIdx = this.open[stream];
    let i = 0;
    if (openIdx !== undefined && parts.length > 0) {
      this.lines[openIdx].text += parts[0];
      this.chars += parts[0].length;
      i = 1;
    }
    for (; i < parts.length; i++) {
      this.lines.push({ stream, text: parts[i], seq });
      this.chars += parts[i].length;
    }
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
    this.chars = 0;
    this.generation++;
    this.changed();
  }

  /** Absolute numbers (`dropped + index`) of the lines still open (at most one per stream). */
  openLines(): number[] {
    return Object.values(this.open).map((i) => i + this.dropped);
  }

  /** Absolute number one past the last line. */
  get end(): number {
    return this.dropped + this.lines.length;
  }

  private trim(): void {
    const excess = this.lines.length - this.maxLines;
    if (excess <= 0 && this.chars <= this.maxChars) return;
    // Drop in blocks so trimming is rare: a tenth of the cap, or as many lines as the
    // characters over the cap (plus a tenth) take.
    let n = Math.max(excess, Math.floor(this.maxLines / 10));
    if (this.chars > this.maxChars) {
      let cut = 0;
      let k = 0;
      const goal = this.chars - this.maxChars + Math.floor(this.maxChars / 10);
      while (k < this.lines.length - 1 && cut < goal) cut += this.lines[k++].text.length;
      n = Math.max(excess, k);
    }
    n = Math.min(n, this.lines.length);
    for (let k = 0; k < n; k++) this.chars -= this.lines[k].text.length;
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

/** A case-insensitive matcher for the search text (taken literally), or null for none. */
export function matcher(query: string): RegExp | null {
  if (!query) return null;
  return new RegExp(query.replace(/[.*+?^${}()|[\]\\]/g, '\\$&'), 'i');
}

/** `text` cut into the parts that match `query` (case-insensitive) and the parts between. */
export function highlightParts(text: string, query: string): { text: string; hit: boolean }[] {
  const re = matcher(query);
  if (!re) return [{ text, hit: false }];
  const g = new RegExp(re.source, 'gi');
  const out: { text: string; hit: boolean }[] = [];
  let last = 0;
  for (let m = g.exec(text); m; m = g.exec(text)) {
    if (m.index > last) out.push({ text: text.slice(last, m.index), hit: false });
    out.push({ text: m[0], hit: true });
    last = m.index + m[0].length;
  }
  if (last < text.length || out.length === 0) out.push({ text: text.slice(last), hit: false });
  return out;
}

/** First index in the sorted `arr` whose value is ≥ `v`. */
export function lowerBound(arr: ArrayLike<number>, v: number): number {
  let lo = 0;
  let hi = arr.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (arr[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Visual rows a line of `len` characters takes when wrapped at `perRow` characters. */
export function wrappedRows(len: number, perRow: number): number {
  return perRow > 0 && len > perRow ? Math.ceil(len / perRow) : 1;
}

/**
 * The viewer's window onto a buffer. Rows are the lines of the visible streams, in order;
 * matches are absolute line numbers (`dropped + index`), so dropping old lines does not
 * shift them. Call `update()` after the buffer changed (once per frame).
 */
export class LogView {
  private streams: Record<LogStream, boolean> = { stdout: true, stderr: true, system: true };
  private query = '';
  private re: RegExp | null = null;
  /** Absolute numbers of the visible lines; null while every stream is shown (row = line). */
  private rows: number[] | null = null;
  /** Absolute numbers of the matching visible lines, ascending. */
  matches: number[] = [];
  /** Lines looked at so far (absolute end) and the lines that were still open then. */
  private seen = 0;
  private openSeen: number[] = [];
  private dropped = 0;
  private generation: number;
  /** Wrapped layout: `offsets[r]` = visual rows before row r, for `perRow` characters a row. */
  private offsets: number[] = [0];
  private perRow = 0;
  /** Rows laid out so far (`offsets` is valid up to here); later rows are new. */
  private offsetsValidTo = 0;
  /** Laid-out rows of lines that were open and may have grown: re-measured, not the rest. */
  private grown: number[] = [];
  /** Bumped whenever rows or matches change: a cheap "did anything change" for renders. */
  revision = 0;

  constructor(readonly buffer: LogBuffer) {
    this.generation = buffer.generation;
    this.rebuild();
  }

  get filter(): Readonly<Record<LogStream, boolean>> {
    return this.streams;
  }

  get search(): string {
    return this.query;
  }

  setStreams(streams: Record<LogStream, boolean>): void {
    this.streams = { ...streams };
    this.rebuild();
  }

  setQuery(query: string): void {
    if (query === this.query) return;
    this.query = query;
    this.re = matcher(query);
    this.rebuildMatches();
  }

  /** Number of rows (visible lines). */
  get rowCount(): number {
    return this.rows ? this.rows.length : this.buffer.lines.length;
  }

  /** Absolute line number of a row. */
  lineOf(row: number): number {
    return this.rows ? this.rows[row] : row + this.buffer.dropped;
  }

  /** The line shown in a row. */
  lineAt(row: number): LogLine {
    return this.buffer.lines[this.lineOf(row) - this.buffer.dropped];
  }

  /** The row of an absolute line number (the next visible row when that line is hidden). */
  rowOf(line: number): number {
    if (!this.rows) return Math.max(0, line - this.buffer.dropped);
    return lowerBound(this.rows, line);
  }

  /** Rows at or after the absolute line `line` (e.g. "lines added since I paused"). */
  rowsFrom(line: number): number {
    return this.rowCount - Math.min(this.rowCount, this.rowOf(line));
  }

  /** Index in `matches` of the first match at or after `row` (wrapping to 0), or -1. */
  matchFromRow(row: number): number {
    if (this.matches.length === 0) return -1;
    const i = lowerBound(this.matches, this.lineOf(Math.min(row, this.rowCount - 1)));
    return i < this.matches.length ? i : 0;
  }

  private visible(l: LogLine): boolean {
    return this.streams[l.stream];
  }

  private rebuild(): void {
    const b = this.buffer;
    this.dropped = b.dropped;
    this.generation = b.generation;
    const all = LOG_STREAMS.every((s) => this.streams[s]);
    if (all) this.rows = null;
    else {
      const rows: number[] = [];
      for (let i = 0; i < b.lines.length; i++) if (this.visible(b.lines[i])) rows.push(i + b.dropped);
      this.rows = rows;
    }
    this.seen = b.end;
    this.openSeen = b.openLines();
    this.resetLayout();
    this.rebuildMatches();
  }

  private rebuildMatches(): void {
    const b = this.buffer;
    const re = this.re;
    const out: number[] = [];
    if (re) {
      const lines = b.lines;
      const streams = this.streams;
      for (let i = 0; i < lines.length; i++) {
        const l = lines[i];
        if (streams[l.stream] && re.test(l.text)) out.push(i + b.dropped);
      }
    }
    this.matches = out;
    this.revision++;
  }

  /** Takes in what the buffer got since the last call. Cost: the new lines only. */
  update(): void {
    const b = this.buffer;
    if (b.generation !== this.generation || b.end < this.seen) {
      this.rebuild();
      return;
    }
    if (b.end === this.seen && b.dropped === this.dropped && this.openSeen.length === 0) return;
    const re = this.re;
    // Lines dropped from the front: forget them (rare: the buffer drops in blocks).
    if (b.dropped !== this.dropped) {
      const cut = b.dropped;
      if (this.rows) this.rows.splice(0, lowerBound(this.rows, cut));
      this.matches.splice(0, lowerBound(this.matches, cut));
      this.dropped = cut;
      this.resetLayout();
    }
    // Lines that were open may have grown: they can only gain a match.
    if (re) {
      for (const abs of this.openSeen) {
        if (abs < b.dropped || abs >= this.seen) continue;
        const l = b.lines[abs - b.dropped];
        if (!this.visible(l)) continue;
        const at = lowerBound(this.matches, abs);
        if (this.matches[at] !== abs && re.test(l.text)) this.matches.splice(at, 0, abs);
      }
    }
    for (let abs = Math.max(this.seen, b.dropped); abs < b.end; abs++) {
      const l = b.lines[abs - b.dropped];
      if (!this.visible(l)) continue;
      if (this.rows) this.rows.push(abs);
      if (re && re.test(l.text)) this.matches.push(abs);
    }
    // Lines that were open may have grown: only their rows are re-measured (layout()
    // shifts the rows after one by its change in height), not every later row.
    for (const abs of this.openSeen) {
      if (abs < b.dropped) continue;
      const l = b.lines[abs - b.dropped];
      if (!l || !this.visible(l)) continue;
      const r = this.rowOf(abs);
      if (r < this.offsetsValidTo) this.grown.push(r);
    }
    this.seen = b.end;
    this.openSeen = b.openLines();
    this.revision++;
  }

  private resetLayout(): void {
    this.offsets = [0];
    this.offsetsValidTo = 0;
    this.grown = [];
  }

  /** Rows measured by the last `layout()` call (for tests: the per-frame cost). */
  measured = 0;

  /**
   * Visual-row offsets for wrapping at `perRow` characters: `offsets[r]` rows come before row
   * r, `offsets[rowCount]` is the total. Extended incrementally (new and still-open rows).
   */
  layout(perRow: number): readonly number[] {
    if (perRow !== this.perRow) {
      this.perRow = perRow;
      this.resetLayout();
    }
    const n = this.rowCount;
    const from = Math.min(this.offsetsValidTo, this.offsets.length - 1, n);
    const off = this.offsets;
    off.length = from + 1;
    this.measured = 0;
    // Grown open lines: a changed height shifts the rows after it (rare: only when a line
    // crosses a row boundary), the others stay as they are.
    for (const r of this.grown) {
      if (r >= from) continue;
      this.measured++;
      const delta = wrappedRows(this.lineAt(r).text.length, perRow) - (off[r + 1] - off[r]);
      if (delta !== 0) for (let k = r + 1; k <= from; k++) off[k] += delta;
    }
    this.grown = [];
    for (let r = from; r < n; r++) off.push(off[r] + wrappedRows(this.lineAt(r).text.length, perRow));
    this.measured += n - from;
    this.offsetsValidTo = n;
    return off;
  }
}

/**
 * Auto-follow of the tail. `paused` with the reason: the Pause button (`user`, stays until
 * Resume), scrolling up (`scroll`, ends when the user scrolls back to the bottom) or jumping
 * to a search match (`search`). `since` is the buffer's end when it paused, so the viewer can
 * say how many lines arrived meanwhile (`LogView.rowsFrom(since)`).
 */
export interface Follow {
  paused: boolean;
  reason: 'user' | 'scroll' | 'search' | null;
  since: number;
}

export const FOLLOWING: Follow = { paused: false, reason: null, since: 0 };

export function pauseFollow(f: Follow, reason: 'user' | 'scroll' | 'search', end: number): Follow {
  // Already paused: keep the first "since", and an explicit pause stays explicit.
  if (f.paused) return f.reason === 'user' || f.reason === reason ? f : { ...f, reason };
  return { paused: true, reason, since: end };
}

/** After a scroll: leaving the bottom pauses; reaching it resumes only a scroll pause. */
export function followAfterScroll(f: Follow, atBottom: boolean, end: number): Follow {
  if (!atBottom) return f.paused ? f : pauseFollow(f, 'scroll', end);
  return f.paused && f.reason === 'scroll' ? FOLLOWING : f;
}

/** A page of `GET /api/commands/{id}/logs`. */
export interface LogPageLike {
  items: { data: string; seq: number; stream?: string | null }[];
  lastSeq: number;
  done: boolean;
}

/**
 * The whole log of a command as text, read from the server page by page (not the viewer's
 * buffer, which may have dropped the oldest lines): stderr and system lines prefixed.
 */
export async function fetchFullLog(page: (after: number) => Promise<LogPageLike>): Promise<string> {
  const b = new LogBuffer(Number.MAX_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
  let after = 0;
  for (;;) {
    const p = await page(after);
    for (const l of p.items) {
      const stream = (LOG_STREAMS as readonly string[]).includes(l.stream ?? '') ? (l.stream as LogStream) : 'stdout';
      b.append(stream, l.data, l.seq);
    }
    if (p.done || p.items.length === 0 || p.lastSeq <= after) break;
    after = p.lastSeq;
  }
  return logText(b.lines);
}

/** Lines as a text file: stderr and system lines prefixed with their stream. */
export function logText(lines: readonly LogLine[]): string {
  return lines.map((l) => (l.stream === 'stdout' ? l.text : `[${l.stream}] ${l.text}`)).join('\n') + '\n';
}
