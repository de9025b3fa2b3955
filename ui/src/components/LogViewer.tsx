// Windowed log viewer: only the visible lines (plus a margin) are in the DOM, so tens of
// thousands of lines stay smooth. Follows the tail while the user is at the bottom; scrolling
// up stops following and shows a "Jump to bottom" button.
import { useCallback, useEffect, useLayoutEffect, useRef, useState } from 'react';
import type { LogBuffer } from '../lib/logbuffer';

const LINE_HEIGHT = 18;
const OVERSCAN = 30;

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

/** Saves the buffered log as a text file (stderr lines prefixed, system lines marked). */
function downloadLog(buffer: LogBuffer, name: string) {
  const text = buffer.lines.map((l) => (l.stream === 'stdout' ? l.text : `[${l.stream}] ${l.text}`)).join('\n');
  const url = URL.createObjectURL(new Blob([text + '\n'], { type: 'text/plain' }));
  const a = document.createElement('a');
  a.href = url;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function LogViewer({
  buffer,
  height = 420,
  live,
  fileName = 'command.log',
}: {
  buffer: LogBuffer;
  height?: number;
  live?: boolean;
  fileName?: string;
}) {
  const scrollRef = useRef<HTMLDivElement>(null);
  const [version, setVersion] = useState(buffer.version);
  const [scrollTop, setScrollTop] = useState(0);
  const [viewport, setViewport] = useState(height);
  const [follow, setFollow] = useState(true);
  const followRef = useRef(true);

  useEffect(() => buffer.subscribe(() => setVersion(buffer.version)), [buffer]);

  useEffect(() => {
    const el = scrollRef.current;
    if (!el || typeof ResizeObserver === 'undefined') return;
    const ro = new ResizeObserver(() => setViewport(el.clientHeight));
    ro.observe(el);
    setViewport(el.clientHeight);
    return () => ro.disconnect();
  }, []);

  const total = buffer.lines.length;

  // Keep the tail in view while following.
  useLayoutEffect(() => {
    const el = scrollRef.current;
    if (!el || !followRef.current) return;
    const target = el.scrollHeight - el.clientHeight;
    if (Math.abs(el.scrollTop - target) > 1) {
      el.scrollTop = target;
      setScrollTop(el.scrollTop);
    }
  }, [version, total, viewport, buffer]);

  const onScroll = useCallback(() => {
    const el = scrollRef.current;
    if (!el) return;
    setScrollTop(el.scrollTop);
    const atBottom = el.scrollTop + el.clientHeight >= el.scrollHeight - LINE_HEIGHT;
    if (atBottom !== followRef.current) {
      followRef.current = atBottom;
      setFollow(atBottom);
    }
  }, []);

  const jump = () => {
    const el = scrollRef.current;
    followRef.current = true;
    setFollow(true);
    if (el) el.scrollTop = el.scrollHeight;
  };

  const [start, end] = visibleRange(scrollTop, viewport, total);
  const rows = [];
  for (let i = start; i < end; i++) {
    const l = buffer.lines[i];
    rows.push(
      <div key={i + buffer.dropped} className={`ll ll-${l.stream}`}>
        <span className="ll-no" aria-hidden="true">
          {i + buffer.dropped + 1}
        </span>
        <span className="ll-text">{l.text === '' ? ' ' : l.text}</span>
      </div>,
    );
  }

  return (
    <div className="logviewer" data-testid="log-viewer">
      <div className="logviewer-bar">
        <span className="muted small" data-testid="log-line-count">
          {total + buffer.dropped} lines{buffer.dropped > 0 ? ` (first ${buffer.dropped} dropped)` : ''}
        </span>
        <span className="legend small">
          <span className="lg lg-stdout">stdout</span>
          <span className="lg lg-stderr">stderr</span>
          <span className="lg lg-system">system</span>
        </span>
        {live && <span className={`small ${follow ? 'live-on' : 'muted'}`}>{follow ? '● following' : 'paused'}</span>}
        <button type="button" className="btn btn-sm btn-log" onClick={() => downloadLog(buffer, fileName)} disabled={total === 0}>
          Download
        </button>
      </div>
      <div
        className="logviewer-scroll"
        ref={scrollRef}
        onScroll={onScroll}
        style={{ height }}
        tabIndex={0}
        role="log"
        aria-label="Command log"
        aria-live="off"
      >
        {total === 0 ? (
          <div className="logviewer-empty muted">{live ? 'Waiting for output…' : 'No log output.'}</div>
        ) : (
          <div style={{ height: total * LINE_HEIGHT, position: 'relative', minWidth: '100%' }}>
            <div style={{ position: 'absolute', top: start * LINE_HEIGHT, left: 0, minWidth: '100%', lineHeight: `${LINE_HEIGHT}px` }}>
              {rows}
            </div>
          </div>
        )}
      </div>
      {!follow && total > 0 && (
        <button type="button" className="btn btn-sm btn-primary jump-bottom" onClick={jump}>
          ↓ Jump to bottom
        </button>
      )}
    </div>
  );
}
