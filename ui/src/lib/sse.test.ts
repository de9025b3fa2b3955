import { describe, expect, it } from 'vitest';
import { SseParser, type SseMessage } from './sse';

function parse(chunks: string[]): { msgs: SseMessage[]; parser: SseParser } {
  const msgs: SseMessage[] = [];
  const parser = new SseParser((m) => msgs.push(m));
  for (const c of chunks) parser.push(c);
  return { msgs, parser };
}

describe('SseParser', () => {
  it('parses events with ids and names', () => {
    const { msgs, parser } = parse(['event: log\nid: 7\ndata: {"seq":7}\n\n']);
    expect(msgs).toEqual([{ event: 'log', id: '7', data: '{"seq":7}', retry: null }]);
    expect(parser.lastEventId).toBe('7');
  });

  it('defaults the event name to message and keeps id null when absent', () => {
    const { msgs } = parse(['data: hi\n\n']);
    expect(msgs).toEqual([{ event: 'message', id: null, data: 'hi', retry: null }]);
  });

  it('joins multi-line data with newlines', () => {
    const { msgs } = parse(['data: line one\ndata: line two\ndata:\ndata:  indented\n\n']);
    expect(msgs[0].data).toBe('line one\nline two\n\n indented');
  });

  it('handles arbitrary chunk boundaries, including inside field names and CRLF', () => {
    const text = 'event: stage\r\nid: 12\r\ndata: {"a":1}\r\n\r\nevent: log\r\nid: 13\r\ndata: x\r\n\r\n';
    for (let size = 1; size <= text.length; size++) {
      const chunks: string[] = [];
      for (let i = 0; i < text.length; i += size) chunks.push(text.slice(i, i + size));
      const { msgs } = parse(chunks);
      expect(msgs.map((m) => [m.event, m.id, m.data])).toEqual([
        ['stage', '12', '{"a":1}'],
        ['log', '13', 'x'],
      ]);
    }
  });

  it('accepts lone CR line endings, split across chunks', () => {
    const { msgs } = parse(['data: a\r', '\rdata: b\r\r']);
    expect(msgs.map((m) => m.data)).toEqual(['a', 'b']);
  });

  it('ignores comments and keep-alives', () => {
    const { msgs } = parse([': keep-alive\n\n', ':\n', 'data: x\n', ': in between\n', '\n']);
    expect(msgs.map((m) => m.data)).toEqual(['x']);
  });

  it('strips one leading space only and supports fields without colon', () => {
    const { msgs } = parse(['data:  two spaces\n\n', 'data\n\n']);
    expect(msgs.map((m) => m.data)).toEqual([' two spaces', '']);
  });

  it('reads retry and ignores invalid retry values', () => {
    const { msgs } = parse(['retry: 2500\ndata: a\n\nretry: soon\ndata: b\n\n']);
    expect(msgs.map((m) => m.retry)).toEqual([2500, null]);
  });

  it('passes on named events without data (event: end)', () => {
    const { msgs } = parse(['event: end\n\n']);
    expect(msgs).toEqual([{ event: 'end', id: null, data: '', retry: null }]);
  });

  it('does not dispatch an unterminated message at end of stream', () => {
    const { msgs, parser } = parse(['data: complete\n\ndata: partial']);
    parser.end();
    expect(msgs.map((m) => m.data)).toEqual(['complete']);
  });

  it('strips a BOM at the start', () => {
    const { msgs } = parse(['\ufeffdata: x\n\n']);
    expect(msgs[0].data).toBe('x');
  });

  it('keeps lastEventId across messages and ignores ids with NUL', () => {
    const { parser, msgs } = parse(['id: 5\ndata: a\n\ndata: b\n\nid: 6\u0000\ndata: c\n\n']);
    expect(msgs.map((m) => m.id)).toEqual(['5', null, null]);
    expect(parser.lastEventId).toBe('5');
  });
});
