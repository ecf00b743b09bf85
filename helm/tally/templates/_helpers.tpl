{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "tally.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: release name + chart name, unless the release name already contains the chart name.
*/}}
{{- define "tally.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
helm.sh/chart label value.
*/}}
{{- define "tally.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: only the immutable name and instance.
*/}}
{{- define "tally.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tally.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Standard labels. Call with (dict "ctx" $ "component" "server").
*/}}
{{- define "tally.labels" -}}
{{- $ctx := .ctx -}}
helm.sh/chart: {{ include "tally.chart" $ctx }}
{{ include "tally.selectorLabels" $ctx }}
app.kubernetes.io/version: {{ include "tally.versionLabel" $ctx | quote }}
app.kubernetes.io/component: {{ .component | default "server" }}
app.kubernetes.io/part-of: {{ $ctx.Values.partOf | default (include "tally.name" $ctx) }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
{{- end }}

{{/*
app.kubernetes.io/version: the image tag (or appVersion), made a valid label value.
*/}}
{{- define "tally.versionLabel" -}}
{{- .Values.image.tag | default .Chart.AppVersion | replace "+" "_" | replace ":" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Container image reference.
*/}}
{{- define "tally.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "tally.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tally.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Database mode: "postgres" when a Secret or an inline URL is given, else "sqlite".
*/}}
{{- define "tally.dbMode" -}}
{{- if or .Values.database.existingSecret .Values.database.url }}postgres{{- else }}sqlite{{- end }}
{{- end }}

{{/*
Name of the Secret holding the database URL (postgres mode).
*/}}
{{- define "tally.databaseSecretName" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecret }}
{{- else }}
{{- printf "%s-database" (include "tally.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Key of the database URL in that Secret.
*/}}
{{- define "tally.databaseSecretKey" -}}
{{- if .Values.database.existingSecret }}
{{- .Values.database.existingSecretKey | default "database-url" }}
{{- else }}
{{- "database-url" }}
{{- end }}
{{- end }}

{{/*
Whether the migration hook Job runs: postgres mode and migrations.enabled.
*/}}
{{- define "tally.migrationJob" -}}
{{- if and (eq (include "tally.dbMode" .) "postgres") .Values.migrations.enabled }}true{{- end }}
{{- end }}

{{/*
Whether more than one pod may run (a PDB is then useful).
*/}}
{{- define "tally.multiReplica" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}true{{- end }}
{{- end }}

{{/*
Secret holding the client CA bundle (mTLS): tls.clientCa.existingSecret, else tls.existingSecret.
*/}}
{{- define "tally.tlsClientCaSecretName" -}}
{{- .Values.tls.clientCa.existingSecret | default .Values.tls.existingSecret }}
{{- end }}

{{/*
Render-time checks. Included by the Deployment so every render runs them.
*/}}
{{- define "tally.validate" -}}
{{- $mode := include "tally.dbMode" . -}}
{{- if and .Values.database.existingSecret .Values.database.url }}
{{- fail "database: set either database.existingSecret (recommended) or database.url (inline, non-production), not both" }}
{{- end }}
{{- if eq $mode "sqlite" }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail (printf "SQLite mode (no database.existingSecret or database.url) supports exactly 1 replica, but replicaCount is %d: configure Postgres via database.existingSecret to scale out" (int .Values.replicaCount)) }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- fail "SQLite mode (no database.existingSecret or database.url) supports exactly 1 replica, so autoscaling.enabled must be false: configure Postgres via database.existingSecret to autoscale" }}
{{- end }}
{{- end }}
{{- if and (not .Values.auth.existingSecret) (not .Values.auth.insecure) }}
{{- fail "auth: set auth.existingSecret to a Secret holding the callers file (production), or auth.insecure=true to run without caller authentication (development only); the server refuses to start otherwise" }}
{{- end }}
{{- $stop := add (int .Values.lifecycle.preStopSleepSeconds) (int .Values.shutdownGraceSeconds) }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $stop) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed lifecycle.preStopSleepSeconds + shutdownGraceSeconds (%d)" (int .Values.terminationGracePeriodSeconds) (int $stop)) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and .Values.ingress.enabled (not (or .Values.ingress.paths.webhook .Values.ingress.paths.billing)) }}
{{- fail "ingress.enabled needs ingress.paths.webhook and/or ingress.paths.billing" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret: the name of a kubernetes.io/tls-style Secret holding the gRPC server certificate chain (tls.certKey) and private key (tls.keyKey)" }}
{{- end }}
{{- if and .Values.tls.clientCa.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCa.enabled (mTLS) needs tls.enabled=true and tls.existingSecret: client certificates can only be verified over TLS" }}
{{- end }}
{{- if and .Values.adminConsole.ingress (not (and .Values.adminConsole.enabled .Values.ingress.enabled)) }}
{{- fail "adminConsole.ingress needs adminConsole.enabled and ingress.enabled" }}
{{- end }}
{{- if and .Values.ingress.tls.enabled (not .Values.ingress.tls.secretName) }}
{{- fail "ingress.tls.enabled needs ingress.tls.secretName" }}
{{- end }}
{{- end }}

{{/*
A TOML scalar: strings JSON-quoted (valid TOML basic strings), whole numbers without ".0"
(Helm decodes YAML numbers as float64), booleans as is.
*/}}
{{- define "tally.tomlValue" -}}
{{- if kindIs "string" . }}
{{- toJson . }}
{{- else if kindIs "bool" . }}
{{- ternary "true" "false" . }}
{{- else if or (kindIs "float64" .) (kindIs "float32" .) }}
{{- if eq (float64 .) (floor .) }}{{ int64 . }}{{ else }}{{ float64 . }}{{ end }}
{{- else if or (kindIs "int" .) (kindIs "int64" .) (kindIs "int32" .) }}
{{- . }}
{{- else }}
{{- fail (printf "config values must be strings, numbers or booleans (got %s)" (kindOf .)) }}
{{- end }}
{{- end }}
