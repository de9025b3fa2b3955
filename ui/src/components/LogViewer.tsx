// Windowed log viewer: only the visible lines (plus a margin) are in the DOM, so 200 000
// lines stay smooth. Because the browser's find cannot see lines that are not rendered, the
// viewer has its own search over the whole buffer (LogView: case-insensitive, match count,
// Enter / Shift+Enter for next / previous). Stream chips filter; Pause stops following the
// tail while lines keep arriving ("N new lines"); Wrap breaks long lines (phones).
import { useCallback, useEffect, useLayoutEffect, useMemo, useRef, useState, type KeyboardEvent } from 'react';
import { FOLLOWING, LOG_STREAMS, LogView, fetchFullLog, followAfterScroll, highlightParts, logText, lowerBound, pauseFollow, type Follow, type LogBuffer } from '../lib/logbuffer';
import { api, errorMessage } from '../lib/api';
import type { LogStream } from '../lib/types';
import './logviewer.css';

const LINE_HEIGHT = 18;
const OVERSCAN = 30;
/** Typing pauses this long before the search runs (a search of 200 000 lines takes ~15 ms). */
const SEARCH_DEBOUNCE_MS = 150;

export function visibleRange(
  scrollTop: number,
  viewportHeight: number,
  total: number,
  lineHeight = LINE_HEIGHT,
  overscan = OVERSCAN,
): [number, number] {
  const first = Math.floor(scrollTop / lineHeight);
  const count = Math.ceil(viewportHeight / lineHeight);
  const start = Math.max(0, first - overscan);
  const end = Math.min(total, first + count + overscan);
  return [start, Math.max(start, end)];
}

/** The rows to render when wrapped: `offsets` are visual rows before each row. */
export function wrappedRange(
  scrollTop: number,
  viewportHeight: number,
  offsets: readonly number[],
  lineHeight = LINE_HEIGHT,
  overscan = OVERSCAN,
): [number, number] {
  const total = offsets.length - 1;
  if (total <= 0) return [0, 0];
  const topRow = Math.floor(scrollTop / lineHeight);
  // The row that contains visual row `topRow`.
  const first = Math.max(0, lowerBound(offsets, topRow + 1) - 1);
  const last = lowerBound(offsets, Math.ceil((scrollTop + viewportHeight) / lineHeight));
  return [Math.max(0, first - overscan), Math.min(total, last + overscan)];
}

const PROBE = 'M'.repeat(100);

const STREAM_LABEL: Record<LogStream, string> = { stdout: 'stdout', stderr: 'stderr', system: 'system' };

/**
 * Saves the log as a text file (stderr lines prefixed, system lines marked): the whole log
 * from the server when the command is known (the buffer may have dropped old lines), else
 * what the buffer holds.
 */
async function downloadLog(buffer: LogBuffer, name: string, commandId?: string) {
  const text = commandId ? await fetchFullLog((after) => api.commandLogs(commandId, after)) : logText(buffer.lines);
  const url = URL.createObjectURL(new Blob([text], { type: 'text/plain' }));
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** Characters per visual row when wrapping, from a measured character and gutter width. */
function measurePerRow(el: HTMLDivElement | null, probe: HTMLSpanElement | null, gutter: HTMLSpanElement | null): number {
  if (!el || !probe) return 0;
  // 100 characters, so the sub-pixel advance is exact enough to break where the browser does.
  const ch = probe.getBoundingClientRect().width / PROBE.length;
  const g = gutter?.getBoundingClientRect().width ?? 56;
  // .ll-text keeps 12px padding on the right.
  const w = el.clientWidth - g - 12;
  return ch > 0 && w > 0 ? Math.max(1, Math.floor(w / ch)) : 0;
}

export function LogViewer({
  buffer,
  height = 420,
  live,
  fileName = 'command.log',
  popoutHref,
  commandId,
}: {
  buffer: LogBuffer;
  /** The command whose log this is: Download then reads the whole log from the server. */
  commandId?: string;
  /** Pixel height of the scrolling area, or `fill` to take the parent's height (log window). */
  height?: number | 'fill';
  live?: boolean;
  fileName?: string;
  /** Where "Open in new window" goes (the log-only page); no link when absent. */
  popoutHref?: string;
}) {
  const scrollRef = useRef<HTMLDivElement>(null);
  const probeRef = useRef<HTMLSpanElement>(null);
  const gutterRef = useRef<HTMLSpanElement>(null);
  const searchRef = useRef<HTMLInputElement>(null);
  const [streams, setStreams] = useState<Record<LogStream, boolean>>({ stdout: true, stderr: true, system: true });
  const [input, setInput] = useState('');
  const [downloadErr, setDownloadErr] = useState<string | null>(null);
  const [query, setQuery] = useState('');
  const [wrap, setWrap] = useState(false);
  const [perRow, setPerRow] = useState(0);
  // Abs line number of the current match.
  const [current, setCurrent] = useState<number | null>(null);
  const [revision, setRevision] = useState(0);
  const [scrollTop, setScrollTop] = useState(0);
  const [viewport, setViewport] = useState(typeof height === 'number' ? height : 600);
  const [follow, setFollowState] = useState<Follow>(FOLLOWING);
  const followRef = useRef<Follow>(FOLLOWING);
  const setFollow = useCallback((f: Follow) => {
    followRef.current = f;
    setFollowState(f);
  }, []);

  // The view keeps the filter and search across a new buffer (same command, reconnect).
  const settings = useRef({ streams, query });
  settings.current = { streams, query };
  const view = useMemo(() => {
    const v = new LogView(buffer);
    v.setStreams(settings.current.streams);
    v.setQuery(settings.current.query);
    return v;
  }, [buffer]);

  useEffect(() => {
    view.update();
    setRevision((r) => r + 1);
    return buffer.subscribe(() => {
      view.update();
      setRevision((r) => r + 1);
    });
  }, [buffer, view]);

  useEffect(() => {
    const el = scrollRef.current;
    if (!el || typeof ResizeObserver === 'undefined') return;
    const measure = () => {
      setViewport(el.clientHeight);
      setPerRow(measurePerRow(el, probeRef.current, gutterRef.current));
    };
    const ro = new ResizeObserver(measure);
    ro.observe(el);
    measure();
    return () => ro.disconnect();
  }, []);

  const total = view.rowCount;
  const wrapping = wrap && perRow > 0;
  const offsets = wrapping ? view.layout(perRow) : null;
  const rowTop = useCallback((r: number) => (offsets ? offsets[Math.min(r, offsets.length - 1)] : r) * LINE_HEIGHT, [offsets]);
  const contentHeight = (offsets ? offsets[offsets.length - 1] : total) * LINE_HEIGHT;

  // Keep the tail in view while following.
  useLayoutEffect(() => {
    const el = scrollRef.current;
    if (!el || followRef.current.paused) return;
    const target = el.scrollHeight - el.clientHeight;
    if (Math.abs(el.scrollTop - target) > 1) {
      el.scrollTop = target;
      setScrollTop(el.scrollTop);
    }
  }, [revision, contentHeight, viewport, follow]);

  const onScroll = useCallback(() => {
    const el = scrollRef.current;
    if (!el) return;
    setScrollTop(el.scrollTop);
    const atBottom = el.scrollTop + el.clientHeight >= el.scrollHeight - LINE_HEIGHT;
    const next = followAfterScroll(followRef.current, atBottom, buffer.end);
    if (next !== followRef.current) setFollow(next);
  }, [buffer, setFollow]);

  const resume = () => {
    setFollow(FOLLOWING);
    const el = scrollRef.current;
    if (el) el.scrollTop = el.scrollHeight;
  };

  /** Scrolls a row to the middle of the viewport. */
  const reveal = (row: number) => {
    const el = scrollRef.current;
    if (!el) return;
    el.scrollTop = Math.max(0, rowTop(row) - el.clientHeight / 2 + LINE_HEIGHT);
    setScrollTop(el.scrollTop);
  };

  const topRow = () => {
    if (offsets) return wrappedRange(scrollTop, 0, offsets, LINE_HEIGHT, 0)[0];
    return Math.floor(scrollTop / LINE_HEIGHT);
  };

  const goToMatch = (k: number) => {
    const abs = view.matches[k];
    if (abs === undefined) {
      setCurrent(null);
      return;
    }
    setCurrent(abs);
    setFollow(pauseFollow(followRef.current, 'search', buffer.end));
    reveal(view.rowOf(abs));
  };

  /** Runs the search now (also when Enter beats the debounce); jumps to the first match in view or below. */
  const runSearch = (q: string) => {
    view.setQuery(q);
    setQuery(q);
    if (!q) {
      setCurrent(null);
      return -1;
    }
    const k = view.matchFromRow(topRow());
    goToMatch(k);
    return k;
  };

  useEffect(() => {
    if (input === query) return;
    const t = setTimeout(() => runSearch(input), SEARCH_DEBOUNCE_MS);
    return () => clearTimeout(t);
    // runSearch reads the latest scroll position when it fires; only the text restarts it.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [input, query]);

  const step = (dir: 1 | -1) => {
    if (input !== query) {
      runSearch(input);
      return;
    }
    const m = view.matches;
    if (m.length === 0) return;
    if (current === null) {
      goToMatch(view.matchFromRow(topRow()));
      return;
    }
    const at = lowerBound(m, current);
    const k = dir === 1 ? (m[at] === current ? at + 1 : at) : at - 1;
    goToMatch((k + m.length) % m.length);
  };

  const onSearchKey = (e: KeyboardEvent<HTMLInputElement>) => {
    if (e.key === 'Enter') {
      e.preventDefault();
      step(e.shiftKey ? -1 : 1);
    } else if (e.key === 'Escape' && input) {
      e.preventDefault();
      e.stopPropagation();
      setInput('');
      runSearch('');
    }
  };

  const toggleStream = (s: LogStream) => {
    const next = { ...streams, [s]: !streams[s] };
    view.setStreams(next);
    setStreams(next);
    // A hidden current match is no longer current.
    if (current !== null && !view.matches.includes(current)) setCurrent(null);
  };

  const toggleWrap = () => {
    const el = scrollRef.current;
    // Keep the current match in view, else the line at the top of the view.
    const keep = current ?? (view.rowCount > 0 ? view.lineOf(Math.min(topRow(), view.rowCount - 1)) : null);
    const nextPerRow = measurePerRow(el, probeRef.current, gutterRef.current);
    setPerRow(nextPerRow);
    setWrap(!wrap);
    if (keep !== null && followRef.current.paused) {
      requestAnimationFrame(() => {
        if (!el) return;
        const r = view.rowOf(keep);
        const layout = !wrap && nextPerRow > 0 ? view.layout(nextPerRow) : null;
        const top = (layout ? layout[r] : r) * LINE_HEIGHT;
        el.scrollTop = current !== null ? Math.max(0, top - el.clientHeight / 2 + LINE_HEIGHT) : top;
        setScrollTop(el.scrollTop);
      });
    }
  };

  const [start, end] = offsets ? wrappedRange(scrollTop, viewport, offsets) : visibleRange(scrollTop, viewport, total);
  const rows = [];
  for (let r = start; r < end; r++) {
    const abs = view.lineOf(r);
    const l = view.lineAt(r);
    if (!l) continue;
    const isCurrent = abs === current;
    const parts = query ? highlightParts(l.text, query) : null;
    rows.push(
      <div
        key={abs}
        className={`ll ll-${l.stream}${isCurrent ? ' ll-current' : ''}`}
        data-line={abs + 1}
        data-current={isCurrent ? 'true' : undefined}
      >
        <span className="ll-no" aria-hidden="true">
          {abs + 1}
        </span>
        <span className="ll-text">
          {l.text === ''
            ? ' '
            : parts && parts.length > 1
              ? parts.map((p, i) =>
                  p.hit ? (
                    <mark key={i} className={isCurrent ? 'lv-hit lv-hit-current' : 'lv-hit'}>
                      {p.text}
                    </mark>
                  ) : (
                    p.text
                  ),
                )
              : l.text}
        </span>
      </div>,
    );
  }

  const allLines = buffer.lines.length + buffer.dropped;
  const matchCount = view.matches.length;
  const currentIndex = current === null ? -1 : lowerBound(view.matches, current);
  const matchText = !query
    ? ''
    : matchCount === 0
      ? 'No matches'
      : currentIndex >= 0 && view.matches[currentIndex] === current
        ? `${currentIndex + 1} of ${matchCount}`
        : `${matchCount} ${matchCount === 1 ? 'match' : 'matches'}`;
  const newLines = follow.paused ? view.rowsFrom(follow.since) : 0;
  const hidden = LOG_STREAMS.filter((s) => !streams[s]);

  return (
    <div className={`logviewer${wrapping ? ' logviewer-wrapped' : ''}${height === 'fill' ? ' logviewer-fill' : ''}`} data-testid="log-viewer" data-follow={follow.paused ? 'paused' : 'following'} data-per-row={wrapping ? perRow : undefined}>
      <div className="logviewer-bar">
        <span className="muted small" data-testid="log-line-count">
          {allLines} lines{buffer.dropped > 0 ? ` (first ${buffer.dropped} dropped)` : ''}
          {hidden.length > 0 ? ` · ${total} shown` : ''}
        </span>
        <span className="lv-chips" role="group" aria-label="Show streams">
          {LOG_STREAMS.map((s) => (
            <button
              key={s}
              type="button"
              className={`lv-chip lg lg-${s}`}
              aria-pressed={streams[s]}
              onClick={() => toggleStream(s)}
              data-testid={`log-stream-${s}`}
              title={streams[s] ? `Hide ${STREAM_LABEL[s]} lines` : `Show ${STREAM_LABEL[s]} lines`}
            >
              {STREAM_LABEL[s]}
            </button>
          ))}
        </span>
        {live && (
          <>
            <span className={`small ${follow.paused ? 'lv-paused' : 'live-on'}`} data-testid="log-follow-state">
              {follow.paused ? 'paused' : '● following'}
            </span>
            {follow.paused && newLines > 0 && (
              <span className="small lv-new" data-testid="log-new-lines">
                {newLines} new {newLines === 1 ? 'line' : 'lines'}
              </span>
            )}
            <button
              type="button"
              className="btn btn-sm btn-log"
              onClick={() => (follow.paused ? resume() : setFollow(pauseFollow(followRef.current, 'user', buffer.end)))}
              data-testid="log-pause"
            >
              {follow.paused ? 'Resume' : 'Pause'}
            </button>
          </>
        )}
        <button type="button" className="btn btn-sm btn-log" aria-pressed={wrap} onClick={toggleWrap} data-testid="log-wrap">
          Wrap lines
        </button>
        <button type="button" className="btn btn-sm btn-log" onClick={() => {
            setDownloadErr(null);
            downloadLog(buffer, fileName, commandId).catch((e: unknown) => setDownloadErr(`Download failed: ${errorMessage(e)}`));
          }} disabled={allLines === 0}>
          Download
        </button>
        {popoutHref && (
          <a className="btn btn-sm btn-log" href={popoutHref} target="_blank" rel="noopener" data-testid="log-popout">
            Open in new window<span className="sr-only"> (opens a new window)</span>
          </a>
        )}
        {downloadErr && <span role="alert">{downloadErr}</span>}
      </div>
      <div className="logviewer-bar lv-search" role="search">
        <input
          ref={searchRef}
          type="search"
          className="lv-search-input"
          placeholder="Search the log"
          aria-label="Search the log"
          aria-describedby="lv-search-help"
          value={input}
          onChange={(e) => setInput(e.target.value)}
          onKeyDown={onSearchKey}
          data-testid="log-search"
        />
        <span id="lv-search-help" className="sr-only">
          Enter for the next match, Shift+Enter for the previous one.
        </span>
        <button type="button" className="btn btn-sm btn-log" onClick={() => step(-1)} disabled={!input || (input === query && matchCount === 0)} aria-label="Previous match" data-testid="log-search-prev">
          ↑
        </button>
        <button type="button" className="btn btn-sm btn-log" onClick={() => step(1)} disabled={!input || (input === query && matchCount === 0)} aria-label="Next match" data-testid="log-search-next">
          ↓
        </button>
        <span className="small lv-match" role="status" aria-live="polite" data-testid="log-search-status" data-count={query ? matchCount : undefined}>
          {matchText}
        </span>
      </div>
      <div
        className="logviewer-scroll"
        ref={scrollRef}
        onScroll={onScroll}
        style={height === 'fill' ? undefined : { height }}
        tabIndex={0}
        role="log"
        aria-label="Command log"
        aria-live="off"
      >
        {/* Measures a character and the line-number gutter for wrapping. */}
        <div className="ll lv-probe" aria-hidden="true">
          <span className="ll-no" ref={gutterRef}>
            0
          </span>
          <span className="ll-text" ref={probeRef}>
            {PROBE}
          </span>
        </div>
        {total === 0 ? (
          <div className="logviewer-empty muted">
            {allLines > 0 ? 'No lines of the shown streams.' : live ? 'Waiting for output…' : 'No log output.'}
          </div>
        ) : (
          <div style={{ height: contentHeight, position: 'relative', minWidth: '100%' }}>
            <div style={{ position: 'absolute', top: rowTop(start), left: 0, minWidth: '100%', width: wrapping ? '100%' : undefined, lineHeight: `${LINE_HEIGHT}px` }}>
              {rows}
            </div>
          </div>
        )}
      </div>
      {follow.paused && total > 0 && (
        <button type="button" className="btn btn-sm btn-primary jump-bottom" onClick={resume} data-testid="log-jump-bottom">
          ↓ {newLines > 0 ? `${newLines} new ${newLines === 1 ? 'line' : 'lines'}` : 'Jump to bottom'}
        </button>
      )}
    </div>
  );
}
