import { describe, expect, it } from 'vitest';
import { durationBetween, formatBytes, formatDuration, formatMemory, relativeTime } from './time';

const now = Date.parse('2026-11-25T10:00:00Z');
const ago = (s: number) => new Date(now - s * 1000).toISOString();

describe('relativeTime', () => {
  it('formats seconds, minutes, hours and days', () => {
    expect(relativeTime(ago(0), now)).toBe('just now');
    expect(relativeTime(ago(1), now)).toBe('just now');
    expect(relativeTime(ago(12), now)).toBe('12 s ago');
    expect(relativeTime(ago(59), now)).toBe('59 s ago');
    expect(relativeTime(ago(60), now)).toBe('1 min ago');
    expect(relativeTime(ago(3599), now)).toBe('59 min ago');
    expect(relativeTime(ago(7200), now)).toBe('2 h ago');
    expect(relativeTime(ago(86400 * 3), now)).toBe('3 d ago');
  });
  it('handles future, missing and invalid timestamps', () => {
    expect(relativeTime(ago(-30), now)).toBe('in 30 s');
    expect(relativeTime(null, now)).toBe('never');
    expect(relativeTime('garbage', now)).toBe('never');
  });
});

describe('durations and sizes', () => {
  it('formats durations', () => {
    expect(formatDuration(850)).toBe('850 ms');
    expect(formatDuration(1234)).toBe('1.2 s');
    expect(formatDuration(42_000)).toBe('42 s');
    expect(formatDuration(65_000)).toBe('1 m 05 s');
    expect(formatDuration(2 * 3600_000 + 3 * 60_000)).toBe('2 h 03 m');
    expect(formatDuration(null)).toBe('–');
    expect(formatDuration(-1)).toBe('–');
  });
  it('computes durations up to now when unfinished', () => {
    expect(durationBetween(ago(10), ago(4), now)).toBe(6000);
    expect(durationBetween(ago(10), null, now)).toBe(10000);
    expect(durationBetween(null, null, now)).toBeNull();
  });
  it('formats memory and bytes', () => {
    expect(formatMemory(2048)).toBe('2 GiB');
    expect(formatMemory(1536)).toBe('1.5 GiB');
    expect(formatMemory(512)).toBe('512 MiB');
    expect(formatBytes(10 * 1024 ** 3)).toBe('10 GiB');
    expect(formatBytes(null)).toBe('–');
  });
});
