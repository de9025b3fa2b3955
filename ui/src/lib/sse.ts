// Incremental parser for the text/event-stream format (WHATWG HTML, "server-sent events").
// Feed it decoded text in arbitrary chunks; it emits one message per blank line.

export interface SseMessage {
  /** The `event:` field, "message" when absent. */
  event: string;
  /** All `data:` lines joined with "\n". */
  data: string;
  /** The `id:` field of this message, or null when it had none. */
  id: string | null;
  /** A `retry:` value (ms) when present. */
  retry: number | null;
}

export class SseParser {
  private buf = '';
  private pendingCR = false;
  private started = false;
  private event = '';
  private data: string[] = [];
  private hasData = false;
  private id: string | null = null;
  private retry: number | null = null;
  /** The last event id seen (persists across messages, as in the spec). */
  lastEventId = '';

  constructor(private readonly onMessage: (m: SseMessage) => void) {}

  /** Feeds a chunk of decoded text. */
  push(chunk: string): void {
    if (!this.started) {
      if (chunk.length === 0) return;
      this.started = true;
      if (chunk.charCodeAt(0) === 0xfeff) chunk = chunk.slice(1);
    }
    // A "\r" at the end of the previous chunk may be the first half of "\r\n".
    if (this.pendingCR) {
      this.pendingCR = false;
      if (chunk.startsWith('\n')) chunk = chunk.slice(1);
    }
    let text = this.buf + chunk;
    let start = 0;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c !== 10 && c !== 13) continue;
      this.line(text.slice(start, i));
      if (c === 13) {
        if (i + 1 < text.length) {
          if (text.charCodeAt(i + 1) === 10) i++;
        } else {
          this.pendingCR = true;
        }
      }
      start = i + 1;
    }
    text = text.slice(start);
    this.buf = text;
  }

  /** Ends the stream: an unterminated message is discarded, as the spec says. */
  end(): void {
    this.buf = '';
    this.resetMessage();
  }

  private resetMessage(): void {
    this.event = '';
    this.data = [];
    this.hasData = false;
    this.id = null;
    this.retry = null;
  }

  private line(line: string): void {
    if (line === '') {
      this.dispatch();
      return;
    }
    if (line.startsWith(':')) return; // comment / keep-alive
    const colon = line.indexOf(':');
    let field: string;
    let value: string;
    if (colon === -1) {
      field = line;
      value = '';
    } else {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.startsWith(' ')) value = value.slice(1);
    }
    switch (field) {
      case 'event':
        this.event = value;
        break;
      case 'data':
        this.data.push(value);
        this.hasData = true;
        break;
      case 'id':
        if (!value.includes('\0')) {
          this.id = value;
          this.lastEventId = value;
        }
        break;
      case 'retry':
        if (/^\d+$/.test(value)) this.retry = Number(value);
        break;
      default:
        break;
    }
  }

  private dispatch(): void {
    const msg: SseMessage = {
      event: this.event || 'message',
      data: this.data.join('\n'),
      id: this.id,
      retry: this.retry,
    };
    const hasData = this.hasData;
    const hasEvent = this.event !== '';
    this.resetMessage();
    // The spec drops messages without data; we also pass on data-less named events
    // (e.g. a bare `event: end`), which some servers send.
    if (hasData || hasEvent) this.onMessage(msg);
  }
}
