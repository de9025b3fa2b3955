import { describe, expect, it } from 'vitest';
import { LogBuffer } from './logbuffer';
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
