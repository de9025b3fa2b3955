import { describe, expect, it } from 'vitest';
import {
  parseNameList,
  parseTerraformVars,
  validateBridge,
  validateCores,
  validateGitRef,
  validateMemory,
  validateProxmoxTemplateId,
  validateRepoPath,
  validateVmName,
} from './validation';

describe('memory', () => {
  it('accepts 16…4194304 MiB', () => {
    expect(validateMemory('16')).toBeNull();
    expect(validateMemory('4194304')).toBeNull();
    expect(validateMemory(2048)).toBeNull();
  });
  it('explains what is wrong', () => {
    expect(validateMemory('')).toMatch(/required/);
    expect(validateMemory('15')).toMatch(/at least 16/);
    expect(validateMemory('4194305')).toMatch(/at most 4194304/);
    expect(validateMemory('2.5')).toMatch(/whole number/);
    expect(validateMemory('2G')).toMatch(/whole number/);
    expect(validateMemory('-5')).toMatch(/whole number/);
  });
});

describe('cores', () => {
  it('accepts 1…512', () => {
    expect(validateCores('1')).toBeNull();
    expect(validateCores(' 512 ')).toBeNull();
  });
  it('rejects out of range and non-integers', () => {
    expect(validateCores('0')).toMatch(/at least 1/);
    expect(validateCores('513')).toMatch(/at most 512/);
    expect(validateCores('two')).toMatch(/whole number/);
    expect(validateCores(' ')).toMatch(/required/);
  });
});

describe('VM name', () => {
  it('accepts DNS names', () => {
    for (const n of ['web-1', 'a', 'DB01', 'app.example', 'x'.repeat(63)]) expect(validateVmName(n)).toBeNull();
  });
  it('rejects invalid names with a reason', () => {
    expect(validateVmName('')).toMatch(/required/);
    expect(validateVmName('-web')).toMatch(/hyphen/);
    expect(validateVmName('web-')).toMatch(/hyphen/);
    expect(validateVmName('web_1')).toMatch(/letters, digits and hyphens/);
    expect(validateVmName('my vm')).toMatch(/letters, digits and hyphens/);
    expect(validateVmName('a..b')).toMatch(/empty parts/);
    expect(validateVmName('x'.repeat(64))).toMatch(/63/);
    expect(validateVmName(' web')).toMatch(/spaces/);
  });
});

describe('template fields', () => {
  it('checks VMIDs and bridges', () => {
    expect(validateProxmoxTemplateId('')).toBeNull();
    expect(validateProxmoxTemplateId('9000')).toBeNull();
    expect(validateProxmoxTemplateId('99')).toMatch(/100/);
    expect(validateBridge('vmbr0')).toBeNull();
    expect(validateBridge('vm br')).toMatch(/bridge/);
  });
});

describe('terraform vars', () => {
  it('accepts an object or empty text', () => {
    expect(parseTerraformVars('')).toEqual({ ok: true, value: {} });
    expect(parseTerraformVars('{"region":"eu","count":3,"tags":{"a":1}}')).toEqual({ ok: true, value: { region: 'eu', count: 3, tags: { a: 1 } } });
  });
  it('rejects invalid JSON with the parser message', () => {
    const r = parseTerraformVars('{"region": }');
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.error).toMatch(/not valid JSON/);
  });
  it('rejects non-objects and bad variable names', () => {
    for (const v of ['[]', '"x"', '3', 'null']) {
      const r = parseTerraformVars(v);
      expect(r.ok).toBe(false);
      if (!r.ok) expect(r.error).toMatch(/JSON object/);
    }
    const r = parseTerraformVars('{"1bad": 1}');
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.error).toMatch(/"1bad" is not a valid Terraform variable name/);
  });
  it('splits sensitive names', () => {
    expect(parseNameList(' db_password, api_key\ntoken  ')).toEqual(['db_password', 'api_key', 'token']);
    expect(parseNameList('')).toEqual([]);
  });
  it('checks repo path and version', () => {
    expect(validateRepoPath('envs/prod')).toBeNull();
    expect(validateRepoPath('/abs')).toMatch(/relative/);
    expect(validateRepoPath('a/../b')).toMatch(/relative/);
    expect(validateGitRef('v1.2.0')).toBeNull();
    expect(validateGitRef('')).toMatch(/required/);
    expect(validateGitRef('--upload-pack=x')).toMatch(/not a valid/);
    expect(validateGitRef('a..b')).toMatch(/not a valid/);
  });
});
