// Validates an AsyncAPI document with the official parser (@asyncapi/parser: the specification's
// JSON Schema, $refs and its Spectral ruleset) and every Avro message payload with the official
// Avro schema parser (@asyncapi/avro-schema-parser, i.e. avsc). The AsyncAPI 3 parser only converts
// custom-format payloads, it does not validate them, so this script runs the Avro validation itself.
// Usage: node validate.mjs <document>. Prints every diagnostic; exits 1 if any is an error.
import { readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { Parser, DiagnosticSeverity } from '@asyncapi/parser';
import { AvroSchemaParser } from '@asyncapi/avro-schema-parser';

const file = process.argv[2];
if (!file) {
  console.error('usage: node validate.mjs <asyncapi document>');
  process.exit(2);
}
const avro = AvroSchemaParser();
const parser = new Parser();
parser.registerSchemaParser(avro);
const source = resolve(file);
const text = readFileSync(source, 'utf8');
const { document, diagnostics } = await parser.parse(text, { source });

// Every message payload in an Avro schema format, validated as Avro (what a producer would use).
const avroFormats = new Set(avro.getMimeTypes());
const raw = JSON.parse(text);
const messages = [
  ...Object.entries(raw.components?.messages ?? {}).map(([id, m]) => [['components', 'messages', id], m]),
  ...Object.entries(raw.channels ?? {}).flatMap(([channel, c]) => Object.entries(c?.messages ?? {})
    .map(([id, m]) => [['channels', channel, 'messages', id], m])),
];
let avroPayloads = 0;
for (const [path, message] of messages) {
  const payload = message?.payload;
  if (!payload || typeof payload !== 'object' || !('schemaFormat' in payload)) continue;  // a $ref, or JSON Schema
  if (!avroFormats.has(payload.schemaFormat)) continue;
  avroPayloads += 1;
  const where = [...path, 'payload', 'schema'];
  for (const problem of await avro.validate({ data: payload.schema, path: where })) {
    diagnostics.push({ code: 'avro-schema', severity: DiagnosticSeverity.Error, path: where,
                       message: `invalid Avro schema: ${problem.message}` });
  }
}

const names = { [DiagnosticSeverity.Error]: 'error', [DiagnosticSeverity.Warning]: 'warning',
                [DiagnosticSeverity.Information]: 'info', [DiagnosticSeverity.Hint]: 'hint' };
for (const d of diagnostics) {
  const where = d.path && d.path.length ? d.path.join('.') : '(document)';
  console.log(`${names[d.severity] ?? d.severity} ${d.code}: ${where}: ${d.message}`);
}
const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error);
if (errors.length || !document) {
  console.error(`${file}: INVALID, ${errors.length} error(s)`);
  process.exit(1);
}
console.log(`${file}: valid AsyncAPI ${document.version()}: ${document.channels().length} channels, `
  + `${document.components().messages().length} messages (${avroPayloads} Avro payloads valid), `
  + `${document.operations().length} operations; ${diagnostics.length} diagnostic(s), none an error`);
