// Validates third-party custom resources in the given YAML files against the schemas their
// projects publish (npm @kubernetes-models/argo-cd for Argo CD, @kubernetes-models/keda for
// KEDA: required fields, types, enums; they admit unknown fields).
// Usage: node scripts/validate-crs.js FILE...
"use strict";
const fs = require("fs");
const yaml = require("js-yaml");

const MODELS = {
  "argoproj.io/v1alpha1": "@kubernetes-models/argo-cd/argoproj.io/v1alpha1",
  "keda.sh/v1alpha1": "@kubernetes-models/keda/keda.sh/v1alpha1",
};

let failed = 0;
let checked = 0;
for (const file of process.argv.slice(2)) {
  for (const doc of yaml.loadAll(fs.readFileSync(file, "utf8"))) {
    if (!doc) continue;
    const where = `${file}: ${doc.kind} ${doc.metadata && doc.metadata.name}`;
    const module = MODELS[doc.apiVersion];
    const Model = module && require(module)[doc.kind];
    if (!Model) {
      console.error(`FAIL ${where}: ${doc.apiVersion} ${doc.kind} is not a kind this check knows`);
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
console.log(`${checked} objects valid against their published schemas, ${failed} failed`);
process.exit(failed ? 1 : 0);
