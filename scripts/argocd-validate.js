// Validates the Argo CD objects of the given YAML files against Argo CD's published schema (npm
// @kubernetes-models/argo-cd: required fields, types, enums; it admits unknown fields).
// Usage: node scripts/argocd-validate.js FILE...
"use strict";
const fs = require("fs");
const yaml = require("js-yaml");
const argo = require("@kubernetes-models/argo-cd/argoproj.io/v1alpha1");

let failed = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (!doc) continue;
    const Model = argo[doc.kind];
    const where = `${file}: ${doc.kind} ${doc.metadata && doc.metadata.name}`;
    if (!doc.apiVersion || !doc.apiVersion.startsWith("argoproj.io/") || !Model) {
      console.error(`FAIL ${where}: not an Argo CD object this check knows`);
      failed++;
      continue;
    }
    try {
      new Model(doc).validate();
      checked++;
      console.log(`ok   ${where}`);
    } catch (e) {
      failed++;
      console.error(`FAIL ${where}: ${e.message}`);
    }
  }
}
console.log(`argocd: ${checked} objects valid against @kubernetes-models/argo-cd, ${failed} failed`);
process.exit(failed ? 1 : 0);
