import { describe, expect, it } from 'vitest';
import { FOLLOWING, LogBuffer, LogView, followAfterScroll, highlightParts, pauseFollow, wrappedRows } from './logbuffer';
import type { LogStream } from './types';

const STREAMS: LogStream[] = ['stdout', 'stdout', 'stdout', 'stderr', 'system'];

/** A buffer of `n` lines "line 00000001 …", every 5th on stderr and every 5th+1 on system. */
function bigBuffer(n: number, max = 200_000): LogBuffer {
  const b = new LogBuffer(max);
  const chunk: string[] = [];
  let stream: LogStream = 'stdout';
  for (let i = 0; i < n; i++) {
    const s = STREAMS[i % 5];
    if (s !== stream && chunk.length) {
      b.append(stream, chunk.join(''), i);
      chunk.length = 0;
    }
    stream = s;
    chunk.push(`line ${String(i + 1).padStart(8, '0')} ${s === 'stderr' ? 'WARNING disk slow' : 'ok ..................................................'}\n`);
  }
  if (chunk.length) b.append(stream, chunk.join(''), n);
  return b;
}

describe('LogView search', () => {
  it('searches 200 000 lines, case-insensitive, with the right count, and says how long it took', () => {
    const b = bigBuffer(200_000);
    expect(b.lines.length).toBe(200_000);
    const v = new LogView(b);
    const t0 = performance.now();
    v.setQuery('line 00123457');
    const one = performance.now() - t0;
    expect(v.matches).toEqual([123_456]);
    expect(v.lineAt(v.rowOf(v.matches[0])).text).toMatch(/^line 00123457 /);

    const t1 = performance.now();
    v.setQuery('warning DISK');
    const many = performance.now() - t1;
    // Every 5th line (index 3 mod 5) is the stderr warning.
    expect(v.matches.length).toBe(40_000);
    expect(v.matches.every((abs) => abs % 5 === 3)).toBe(true);

    const t2 = performance.now();
    v.setQuery('no such text anywhere');
    const none = performance.now() - t2;
    expect(v.matches).toEqual([]);
    console.log(
      `search over 200000 lines: one match ${one.toFixed(1)} ms, 40000 matches ${many.toFixed(1)} ms, no match ${none.toFixed(1)} ms`,
    );
    // Generous bound for slow CI machines; typically a few tens of ms.
    expect(Math.max(one, many, none)).toBeLessThan(1000);
  });

  it('takes the search text literally (regex characters are not special)', () => {
    const b = new LogBuffer();
    b.append('stdout', 'a.b\naxb\n(x)\n[y]*\n', 1);
    const v = new LogView(b);
    v.setQuery('a.b');
    expect(v.matches).toEqual([0]);
    v.setQuery('(X)');
    expect(v.matches).toEqual([2]);
    v.setQuery('[y]*');
    expect(v.matches).toEqual([3]);
  });

  it('keeps matches up to date as lines arrive, including a line that was still open', () => {
    const b = new LogBuffer();
    const v = new LogView(b);
    v.setQuery('needle');
    b.append('stdout', 'hay\nneedle one\nhalf a nee', 1);
    v.update();
    expect(v.matches).toEqual([1]);
    // The open line completes into a match.
    b.append('stdout', 'dle\nmore hay\nNEEDLE three\n', 2);
    v.update();
    expect(v.matches).toEqual([1, 2, 4]);
    expect(v.rowCount).toBe(5);
  });

  it('appending costs only the new lines: 1 000 frames of 200 lines on top of 200 000', () => {
    const b = bigBuffer(200_000, 400_000);
    const v = new LogView(b);
    v.setQuery('line 0020');
    const before = v.matches.length;
    const t0 = performance.now();
    for (let f = 0; f < 1000; f++) {
      const lines = [];
      for (let j = 0; j < 200; j++) lines.push(`line ${String(200_001 + f * 200 + j).padStart(8, '0')} tail\n`);
      b.append('stdout', lines.join(''), f);
      v.update();
    }
    const ms = performance.now() - t0;
    console.log(`1000 incremental updates (200 lines each) on a 200000-line view: ${ms.toFixed(1)} ms total`);
    // "line 0020xxxx" for 200001..209999 adds 10000 matches (0020 0001 … 0020 9999 minus < 200001).
    expect(v.matches.length).toBe(before + 9_999);
    expect(v.rowCount).toBe(400_000);
  });

  it('forgets matches and rows of lines the buffer dropped', () => {
    const b = new LogBuffer(100);
    const v = new LogView(b);
    v.setQuery('7');
    for (let i = 0; i < 250; i++) {
      b.append('stdout', `${i}\n`, i + 1);
      v.update();
    }
    expect(v.rowCount).toBe(b.lines.length);
    expect(v.matches.every((abs) => abs >= b.dropped)).toBe(true);
    expect(v.matches.map((abs) => b.lines[abs - b.dropped].text).every((t) => t.includes('7'))).toBe(true);
    const expected = b.lines.filter((l) => l.text.includes('7')).length;
    expect(v.matches.length).toBe(expected);
  });

  it('starts over when the buffer is cleared', () => {
    const b = new LogBuffer();
    const v = new LogView(b);
    v.setQuery('x');
    b.append('stdout', 'x\nx\n', 1);
    v.update();
    expect(v.matches.length).toBe(2);
    b.clear();
    b.append('stdout', 'y\nx\n', 1);
    v.update();
    expect(v.matches).toEqual([1]);
  });

  it('highlights every case-insensitive occurrence', () => {
    expect(highlightParts('Error: error at ERROR', 'error')).toEqual([
      { text: 'Error', hit: true },
      { text: ': ', hit: false },
      { text: 'error', hit: true },
      { text: ' at ', hit: false },
      { text: 'ERROR', hit: true },
    ]);
    expect(highlightParts('plain', '')).toEqual([{ text: 'plain', hit: false }]);
    expect(highlightParts('', 'x')).toEqual([{ text: '', hit: false }]);
  });
});

describe('LogView stream filter', () => {
  it('shows only the chosen streams, and search counts only what is shown', () => {
    const b = bigBuffer(1000);
    const v = new LogView(b);
    expect(v.rowCount).toBe(1000);
    v.setStreams({ stdout: false, stderr: true, system: false });
    expect(v.rowCount).toBe(200);
    for (let r = 0; r < v.rowCount; r++) expect(v.lineAt(r).stream).toBe('stderr');
    v.setQuery('line 0000');
    // Lines 1..9999 all start "line 0000": only the 200 stderr ones count.
    expect(v.matches.length).toBe(200);
    v.setStreams({ stdout: true, stderr: false, system: true });
    expect(v.rowCount).toBe(800);
    expect(v.matches.length).toBe(800);
    // A match's row is where it is shown.
    const m = v.matches[10];
    expect(v.lineOf(v.rowOf(m))).toBe(m);
    // New lines respect the filter.
    b.append('stderr', 'line 00000000 hidden\n', 2000);
    b.append('system', 'line 00000000 shown\n', 2001);
    v.update();
    expect(v.rowCount).toBe(801);
    expect(v.lineAt(800).text).toBe('line 00000000 shown');
    expect(v.matches.length).toBe(801);
  });

  it('finds the next match from a row, wrapping round', () => {
    const b = new LogBuffer();
    b.append('stdout', ['a', 'hit', 'b', 'c', 'hit', 'd'].join('\n') + '\n', 1);
    const v = new LogView(b);
    v.setQuery('hit');
    expect(v.matchFromRow(0)).toBe(0);
    expect(v.matchFromRow(2)).toBe(1);
    expect(v.matchFromRow(5)).toBe(0);
  });
});

describe('follow / pause', () => {
  it('an explicit pause stays until resumed; new lines are counted, not lost', () => {
    const b = new LogBuffer();
    const v = new LogView(b);
    b.append('stdout', 'a\nb\n', 1);
    v.update();
    let f = pauseFollow(FOLLOWING, 'user', b.end);
    expect(f).toEqual({ paused: true, reason: 'user', since: 2 });
    b.append('stdout', 'c\nd\ne\n', 2);
    v.update();
    expect(v.rowCount).toBe(5);
    expect(v.rowsFrom(f.since)).toBe(3);
    // Reaching the bottom does not end an explicit pause; scrolling up does not change it.
    expect(followAfterScroll(f, true, b.end)).toBe(f);
    f = followAfterScroll(f, false, b.end);
    expect(f.reason).toBe('user');
    // Only the lines of shown streams count.
    v.setStreams({ stdout: true, stderr: false, system: true });
    b.append('stderr', 'x\n', 3);
    v.update();
    expect(v.rowsFrom(f.since)).toBe(3);
  });

  it('scrolling up pauses, scrolling back to the bottom resumes', () => {
    let f = followAfterScroll(FOLLOWING, false, 10);
    expect(f).toEqual({ paused: true, reason: 'scroll', since: 10 });
    expect(followAfterScroll(f, false, 20)).toBe(f);
    f = followAfterScroll(f, true, 30);
    expect(f).toBe(FOLLOWING);
    // Jumping to a search match pauses; an explicit pause after that stays explicit.
    f = pauseFollow(FOLLOWING, 'search', 5);
    expect(f.reason).toBe('search');
    expect(pauseFollow(f, 'user', 9)).toEqual({ paused: true, reason: 'user', since: 5 });
  });
});

describe('wrapped layout', () => {
  it('gives long lines several rows and extends as lines arrive', () => {
    expect(wrappedRows(0, 10)).toBe(1);
    expect(wrappedRows(10, 10)).toBe(1);
    expect(wrappedRows(11, 10)).toBe(2);
    const b = new LogBuffer();
    b.append('stdout', `${'x'.repeat(25)}\nshort\n${'y'.repeat(5)}`, 1);
    const v = new LogView(b);
    expect([...v.layout(10)]).toEqual([0, 3, 4, 5]);
    // The open last line grows to 3 rows; a new line follows.
    b.append('stdout', `${'y'.repeat(20)}\nz\n`, 2);
    v.update();
    expect([...v.layout(10)]).toEqual([0, 3, 4, 7, 8]);
    // A different width starts over.
    expect([...v.layout(100)]).toEqual([0, 1, 2, 3, 4]);
  });
});
