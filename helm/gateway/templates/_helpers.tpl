{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "gateway.fullname" -}}
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

{{/* Name of the internal (admin) Service. */}}
{{- define "gateway.adminServiceName" -}}
{{- printf "%s-admin" (include "gateway.fullname" . | trunc 57 | trimSuffix "-") }}
{{- end }}

{{- define "gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gateway.labels" -}}
helm.sh/chart: {{ include "gateway.chart" . }}
{{ include "gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gateway
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
One TOML value. Helm reads every YAML number as float64 and its toToml prints 100000 as
100000.0, which the gateway's integer settings reject, so whole numbers are printed as
integers here. Strings use JSON escaping, which is valid TOML basic-string syntax.
*/}}
{{- define "gateway.tomlValue" -}}
{{- $k := kindOf . -}}
{{- if eq $k "string" -}}
{{ toJson . }}
{{- else if eq $k "bool" -}}
{{ . }}
{{- else if has $k (list "float64" "float32" "int" "int64" "int32") -}}
{{- if eq (float64 (int64 .)) (float64 .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if eq $k "slice" -}}
[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "gateway.tomlValue" $e }}{{ end }}]
{{- else -}}
{{ fail (printf "config: unsupported value %v (%s); use strings, numbers, booleans or lists" . $k) }}
{{- end -}}
{{- end }}

{{/* The settings file: values.config plus what the chart derives, as TOML. Null values are left out. */}}
{{- define "gateway.configToml" -}}
{{- $cfg := deepCopy (default dict .Values.config) }}
{{- range $key := list "listen" "admin_listen" "node_id" }}
{{- if hasKey $cfg $key }}
{{- fail (printf "config.%s is set by the chart (containerPorts / pod name); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- if .Values.auth.allowAnonymous }}
{{- $_ := set $cfg "allow_anonymous" true }}
{{- end }}
# Rendered by the gateway Helm chart from .Values.config; keys as in docs/configuration.md.
{{- range $key := keys $cfg | sortAlpha }}
{{- $v := get $cfg $key }}
{{- if not (kindIs "invalid" $v) }}
{{ $key }} = {{ include "gateway.tomlValue" $v }}
{{- end }}
{{- end }}
{{- end }}

{{/* shutdown_grace_ms as configured, or the gateway's default. */}}
{{- define "gateway.shutdownGraceMs" -}}
{{- $v := get (default dict .Values.config) "shutdown_grace_ms" }}
{{- if kindIs "invalid" $v }}5000{{ else }}{{ int64 $v }}{{ end }}
{{- end }}

{{/*
The admin API (/v1/*) publishes to any channel, sends to and disconnects any user and
drains the pod. Without a token anyone who reaches the admin port can do all of that, so
the chart refuses to render unless a token Secret is referenced or the operator opts out
explicitly with adminToken.disabled=true (NOTES.txt then warns).
*/}}
{{- define "gateway.validateAdminToken" -}}
{{- $t := .Values.adminToken }}
{{- if and $t.existingSecret $t.disabled }}
{{- fail "adminToken: set either adminToken.existingSecret or adminToken.disabled=true, not both" }}
{{- end }}
{{- if not (or $t.existingSecret $t.disabled) }}
{{- fail (printf "adminToken: no admin token. The admin API (/v1/*: publish, send, disconnect, drain) would be open to every pod that can reach the admin port. Create a Secret with the token (kubectl create secret generic gateway-admin --from-literal=%s=\"$(openssl rand -hex 32)\") and set adminToken.existingSecret=gateway-admin (key: adminToken.key, default admin-token), or set adminToken.disabled=true to run without one" $t.key) }}
{{- end }}
{{- end }}

{{/* Refuses settings that cannot work together. */}}
{{- define "gateway.validate" -}}
{{- include "gateway.validateAdminToken" . }}
{{- $pre := int64 .Values.lifecycle.preStopSleepSeconds }}
{{- $drainMs := int64 .Values.drain.windowMs }}
{{- $graceMs := int64 (include "gateway.shutdownGraceMs" .) }}
{{- $margin := int64 .Values.drain.marginSeconds }}
{{- $need := add (mul $pre 1000) $drainMs $graceMs (mul $margin 1000) }}
{{- $have := mul (int64 .Values.terminationGracePeriodSeconds) 1000 }}
{{- if gt $need $have }}
{{- fail (printf "terminationGracePeriodSeconds (%d s) is too short: lifecycle.preStopSleepSeconds (%d s) + drain.windowMs (%d ms) + config.shutdown_grace_ms (%d ms) + drain.marginSeconds (%d s) = %d ms" (int64 .Values.terminationGracePeriodSeconds) $pre $drainMs $graceMs $margin $need) }}
{{- end }}
{{- if and (not .Values.auth.allowAnonymous) (not .Values.auth.jwt.hmac.existingSecret) (not .Values.auth.jwt.publicKeys.existingSecret) (not (get (default dict .Values.config) "jwks_url")) }}
{{- fail "no way to authenticate clients: set auth.jwt.hmac.existingSecret, auth.jwt.publicKeys.existingSecret or config.jwks_url, or auth.allowAnonymous=true" }}
{{- end }}
{{- if and (eq .Values.lifecycle.preStopMode "sleep") (semverCompare "<1.30-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "lifecycle.preStopMode=sleep needs Kubernetes >= 1.30 (this cluster: %s); use exec" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret, e.g. from cert-manager)" }}
{{- end }}
{{- if and .Values.redis.existingSecret (not .Values.redis.url) }}
{{- fail "redis.existingSecret is set but redis.url is empty" }}
{{- end }}
{{- end }}

{{/* A label map as k=v,k=v (NOTES.txt). */}}
{{- define "gateway.labelList" -}}
{{- $l := list }}
{{- range $k, $v := . }}{{ $l = append $l (printf "%s=%s" $k (toString $v)) }}{{ end }}
{{- join "," $l }}
{{- end }}

{{/* URL scheme of the public listener. */}}
{{- define "gateway.wsScheme" -}}
{{- if .Values.tls.enabled }}wss{{ else }}ws{{ end }}
{{- end }}
