import { describe, expect, it } from 'vitest';
import { stripUrlCredentials } from '../lib/redact';
import { loadLastDeploy, saveLastDeploy } from './Deploy';

class MemStorage {
  data = new Map<string, string>();
  getItem(k: string) {
    return this.data.get(k) ?? null;
  }
  setItem(k: string, v: string) {
    this.data.set(k, v);
  }
}

describe('repository URL credentials never reach browser storage', () => {
  it('strips userinfo from URLs', () => {
    expect(stripUrlCredentials('https://deploy:s3cret@git.example.com/infra/app.git')).toBe('https://git.example.com/infra/app.git');
    expect(stripUrlCredentials('https://ghp_TOKEN@github.com/o/r.git')).toBe('https://github.com/o/r.git');
    expect(stripUrlCredentials('http://u:p@h:8080/r?x=a@b')).toBe('http://h:8080/r?x=a@b');
    expect(stripUrlCredentials('https://host/path@v1')).toBe('https://host/path@v1');
    expect(stripUrlCredentials('git@github.com:o/r.git')).toBe('git@github.com:o/r.git');
    expect(stripUrlCredentials('file:///srv/repo')).toBe('file:///srv/repo');
    expect(stripUrlCredentials('/srv/repo')).toBe('/srv/repo');
  });

  it('saves the last deploy without the credentials', () => {
    const s = new MemStorage();
    saveLastDeploy({ agentId: 'a1', repo: 'https://deploy:s3cret@git.example.com/app.git', version: 'main', path: 'env/prod' }, s);
    const raw = [...s.data.values()].join('');
    expect(raw).not.toContain('s3cret');
    expect(raw).not.toContain('deploy:');
    expect(loadLastDeploy(s)).toEqual({ agentId: 'a1', repo: 'https://git.example.com/app.git', version: 'main', path: 'env/prod' });
  });

  it('drops credentials an older version stored', () => {
    const s = new MemStorage();
    s.setItem('trellis.deploy.last', JSON.stringify({ agentId: 'a1', repo: 'https://u:old-secret@h/r.git' }));
    expect(loadLastDeploy(s).repo).toBe('https://h/r.git');
    expect(s.getItem('trellis.deploy.last')).not.toContain('old-secret');
    s.setItem('trellis.deploy.last', '{broken');
    expect(loadLastDeploy(s)).toEqual({});
  });
});
