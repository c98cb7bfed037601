// Validates Grafana dashboards against Grafana's own schema: the TypeScript types that
// @grafana/schema (Apache-2.0) generates from Grafana's CUE kinds, turned into JSON Schema by
// ts-json-schema-generator and checked with ajv. Each dashboard is checked as a whole against the
// `Dashboard` the package exports (veneer/dashboard.types), and each panel's `options` and
// `fieldConfig.defaults.custom` against the `Options` and `FieldConfig` of its panel plugin
// (raw/composable/<type>/panelcfg). Objects accept no property their type does not declare, so a
// misspelt key is an error too, with two exceptions the schema itself makes: a query (DataQuery)
// and an annotation query carry their datasource's own fields (a Prometheus annotation's
// titleFormat, a target's expr), which no type in the package declares.
//
//   node validate-dashboards.cjs PACKAGES_DIR SCHEMA_CACHE_DIR DASHBOARD.json...
//
// PACKAGES_DIR holds node_modules with @grafana/schema, ts-json-schema-generator and ajv; the
// generated schemas are cached in SCHEMA_CACHE_DIR (a few seconds each to generate). Prints
// {"file": ["error", ...], ...} as JSON; exits 0 when it could check them all.
"use strict";
const fs = require("fs");
const path = require("path");
const { createRequire } = require("module");

const [packagesDir, cacheDir, ...files] = process.argv.slice(2);
const need = createRequire(path.join(path.resolve(packagesDir), "package.json"));
const Ajv = need("ajv");
const raw = path.join(path.dirname(need.resolve("@grafana/schema/package.json")), "dist/esm/raw");
const version = need("@grafana/schema/package.json").version;

// Objects the schema leaves to the datasource (see above), by where they sit in a dashboard.
const OPEN = {
  Dashboard: [["annotations", "list", "[]"], ["annotations", "list", "[]", "target"]],
};

function openUp(schema, type) {
  for (const where of OPEN[type] || []) {
    let node = schema.definitions[type];
    for (const step of where) node = step === "[]" ? node.items : node.properties[step];
    node.additionalProperties = true;
  }
}

function schemaOf(typesFile, type) {
  const cached = path.join(cacheDir, version, `${path.basename(typesFile, ".d.ts")}.${type}.json`);
  if (fs.existsSync(cached)) return JSON.parse(fs.readFileSync(cached, "utf8"));
  const { createGenerator } = need("ts-json-schema-generator");
  // Inlined (expose: none): the package declares DataSourceRef twice, which named definitions cannot hold.
  const schema = createGenerator({ path: typesFile, type, skipTypeCheck: true, topRef: true, expose: "none" })
    .createSchema(type);
  openUp(schema, type);
  fs.mkdirSync(path.dirname(cached), { recursive: true });
  fs.writeFileSync(cached, JSON.stringify(schema));
  return schema;
}

function panelTypes(type) {
  // composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen.d.ts, or none (row, plugins).
  const dir = path.join(raw, "composable", type, "panelcfg", "x");
  if (!fs.existsSync(dir)) return null;
  return path.join(dir, fs.readdirSync(dir).find((f) => f.endsWith("_types.gen.d.ts")));
}

const ajv = new Ajv({ allErrors: true, strict: false });
const validators = new Map();
function validator(typesFile, type) {
  const key = `${typesFile}#${type}`;
  if (!validators.has(key)) {
    const source = fs.readFileSync(typesFile, "utf8");
    const declared = new RegExp(`export (interface|type) ${type}\\b`).test(source);
    validators.set(key, declared ? ajv.compile(schemaOf(typesFile, type)) : null);
  }
  return validators.get(key);
}

function errors(validate, value, where) {
  if (!validate || validate(value)) return [];
  return validate.errors.map((e) => `${where}${e.instancePath} ${e.message}` +
    (e.params && e.params.additionalProperty ? `: ${e.params.additionalProperty}` : "") +
    (e.params && e.params.allowedValues ? `: ${JSON.stringify(e.params.allowedValues)}` : ""));
}

const dashboardTypes = path.join(raw, "..", "veneer", "dashboard.types.d.ts");
const results = {};
for (const file of files) {
  const board = JSON.parse(fs.readFileSync(file, "utf8"));
  const found = errors(validator(dashboardTypes, "Dashboard"), board, "dashboard");
  const panels = (board.panels || []).flatMap((p) => [p, ...((p.type === "row" && p.panels) || [])]);
  for (const panel of panels) {
    const where = `panel ${JSON.stringify(panel.title)} (${panel.type})`;
    const types = panel.type === "row" ? null : panelTypes(panel.type);
    if (panel.type !== "row" && !types) {
      found.push(`${where}: no panel plugin "${panel.type}" in @grafana/schema ${version}`);
      continue;
    }
    if (!types) continue;
    found.push(...errors(validator(types, "Options"), panel.options || {}, `${where} options`));
    const custom = panel.fieldConfig && panel.fieldConfig.defaults && panel.fieldConfig.defaults.custom;
    if (custom) found.push(...errors(validator(types, "FieldConfig"), custom, `${where} fieldConfig.defaults.custom`));
  }
  results[file] = found;
}
process.stdout.write(JSON.stringify({ schema: `@grafana/schema ${version}`, results }) + "\n");
