import { defineConfig } from 'vitest/config';

// The UI is served by `trellis serve` from the same origin as /api, so the build uses
// relative asset URLs and the dev server proxies /api (including SSE) to a local trellis.
export default defineConfig({
  base: './',
  server: {
    proxy: {
      '/api': { target: 'http://127.0.0.1:8080', changeOrigin: false, ws: false },
    },
  },
  build: { outDir: 'dist', sourcemap: true },
  test: { environment: 'node', include: ['src/**/*.test.ts'] },
});
