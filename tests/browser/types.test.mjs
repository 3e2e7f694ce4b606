// wsbeat.js's types, checked by the TypeScript compiler: the module's own JSDoc (checkJs,
// strict), and a usage of the published wsbeat.d.ts.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import { it } from "node:test";
import { fileURLToPath } from "node:url";

import { CLIENT_JS } from "./lib.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const tsc = path.join(here, "node_modules/typescript/bin/tsc");
const common = ["--noEmit", "--strict", "--target", "es2022", "--module", "nodenext", "--lib", "es2022,dom"];

function compile(args) {
  try {
    execFileSync(process.execPath, [tsc, ...common, ...args], { encoding: "utf8" });
    return "";
  } catch (e) {
    return `${e.stdout}${e.stderr}`;
  }
}

it("wsbeat.js type-checks under its own JSDoc (checkJs, strict)", () => {
  assert.equal(compile(["--allowJs", "--checkJs", CLIENT_JS]), "");
});

it("wsbeat.d.ts types the API as the README uses it", () => {
  assert.equal(compile([path.join(here, "types/usage.ts")]), "");
});
