import { describe, expect, it } from 'vitest';
import { LogBuffer, LogView, fetchFullLog, logText } from './logbuffer';
import { visibleRange } from '../components/LogViewer';

describe('LogBuffer', () => {
  it('splits chunks into lines and continues open lines per stream', () => {
    const b = new LogBuffer();
    b.append('stdout', 'hello ', 1);
    b.append('stdout', 'world\nsecond', 2);
    b.append('stderr', 'oops\n', 3);
    b.append('stdout', ' line\n', 4);
    expect(b.lines.map((l) => [l.stream, l.text])).toEqual([
      ['stdout', 'hello world'],
      ['stdout', 'second line'],
      ['stderr', 'oops'],
    ]);
  });

  it('handles CRLF and blank lines', () => {
    const b = new LogBuffer();
    b.append('system', 'a\r\n\r\nb\n', 1);
    expect(b.lines.map((l) => l.text)).toEqual(['a', '', 'b']);
  });

  it('drops old lines beyond the cap', () => {
    const b = new LogBuffer(100);
    for (let i = 0; i < 250; i++) b.append('stdout', `${i}\n`, i + 1);
    expect(b.lines.length).toBeLessThanOrEqual(100);
    expect(b.dropped + b.lines.length).toBe(250);
    expect(b.lines.at(-1)?.text).toBe('249');
  });

  it('keeps up with 50k lines quickly', () => {
    const b = new LogBuffer();
    const t0 = performance.now();
    for (let i = 0; i < 5000; i++) b.append('stdout', Array.from({ length: 10 }, (_, j) => `line ${i * 10 + j}`).join('\n') + '\n', i);
    expect(b.lines.length).toBe(50000);
    expect(performance.now() - t0).toBeLessThan(2000);
  });
});

describe('visibleRange', () => {
  it('renders only the window plus overscan', () => {
    expect(visibleRange(0, 180, 50000, 18, 5)).toEqual([0, 15]);
    expect(visibleRange(18 * 1000, 180, 50000, 18, 5)).toEqual([995, 1015]);
    expect(visibleRange(18 * 49995, 180, 50000, 18, 5)).toEqual([49990, 50000]);
    expect(visibleRange(0, 180, 0, 18, 5)).toEqual([0, 0]);
  });
});

describe('log size and download', () => {
  it('keeps a whole 200 000-line log (nothing dropped from search)', () => {
    const b = new LogBuffer();
    const chunk = Array.from({ length: 1000 }, (_, j) => `line ${j}`).join('\n') + '\n';
    for (let i = 0; i < 200; i++) b.append('stdout', chunk, i + 1);
    expect(b.lines.length).toBe(200_000);
    expect(b.dropped).toBe(0);
    expect(b.lines[0].text).toBe('line 0');
  });

  it('drops the oldest lines beyond the character cap', () => {
    const b = new LogBuffer(1_000_000, 1000);
    for (let i = 0; i < 50; i++) b.append('stdout', `${'x'.repeat(95)}${String(i).padStart(4, '0')}\n`, i + 1);
    const chars = b.lines.reduce((n, l) => n + l.text.length, 0);
    expect(chars).toBeLessThanOrEqual(1000);
    expect(b.dropped + b.lines.length).toBe(50);
    expect(b.lines.at(-1)?.text.endsWith('0049')).toBe(true);
  });

  it('downloads the whole log from the server, page by page', async () => {
    const all = [
      { seq: 1, stream: 'stdout', data: 'first\nsec' },
      { seq: 2, stream: 'stdout', data: 'ond\n' },
      { seq: 3, stream: 'stderr', data: 'oops\n' },
      { seq: 5, stream: 'system', data: 'done\n' },
    ];
    const asked: number[] = [];
    const text = await fetchFullLog(async (after) => {
      asked.push(after);
      const items = all.filter((l) => l.seq > after).slice(0, 2);
      const last = items.at(-1)?.seq ?? after;
      return { items, lastSeq: last, done: last === 5 };
    });
    expect(asked).toEqual([0, 2]);
    expect(text).toBe('first\nsecond\n[stderr] oops\n[system] done\n');
    // a buffer that dropped its first lines still downloads them
    const b = new LogBuffer(2);
    for (const l of all) b.append(l.stream as 'stdout', l.data, l.seq);
    expect(logText(b.lines)).not.toContain('first');
  });
});

describe('wrap layout with an open line', () => {
  it('re-measures only the open rows, not every later row', () => {
    const b = new LogBuffer();
    b.append('stderr', 'an early line that never ends', 1);
    for (let i = 0; i < 5000; i++) b.append('stdout', `row ${i}\n`, i + 2);
    const v = new LogView(b);
    v.layout(10);
    for (let k = 0; k < 20; k++) {
      b.append('stderr', ' and grows', 6000 + k);
      b.append('stdout', `more ${k}\n`, 7000 + k);
      v.update();
      const off = v.layout(10);
      expect(v.measured).toBeLessThanOrEqual(3);
      // the same offsets as a layout from scratch
      const fresh = new LogView(b).layout(10);
      expect(off[off.length - 1]).toBe(fresh[fresh.length - 1]);
      expect(off[2]).toBe(fresh[2]);
    }
  });
});
