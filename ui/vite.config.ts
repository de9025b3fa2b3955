import { defineConfig } from 'vitest/config';

// The config runs in Node; declared here rather than pulling in @types/node for one variable.
declare const process: { env: Record<string, string | undefined> };

// The UI is served by `trellis serve` from the same origin as /api, so the build uses
// relative asset URLs and the dev server proxies /api (including SSE) to a local trellis.
export default defineConfig({
  base: './',
  server: {
    proxy: {
      // TRELLIS_DEV_API points the dev server at another control plane.
      '/api': { target: process.env.TRELLIS_DEV_API ?? 'http://127.0.0.1:8080', changeOrigin: false, ws: false },
    },
  },
  build: {
    outDir: 'dist',
    sourcemap: true,
    rolldownOptions: {
      onwarn(warning, warn) {
        // TanStack Query marks its hooks "use client" for server-component bundlers; meaningless here.
        if (warning.code === 'MODULE_LEVEL_DIRECTIVE' && /"use client"/.test(warning.message)) return;
        warn(warning);
      },
    },
  },
  test: { environment: 'node', include: ['src/**/*.test.ts'] },
});
