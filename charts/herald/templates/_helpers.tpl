{{/* Names and labels shared by the templates. */}}

{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name, as most charts do it: the release name alone when it already holds the chart's. */}}
{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The operator's objects: <fullname>-operator. */}}
{{- define "herald.operator.fullname" -}}
{{- printf "%s-operator" (include "herald.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "herald.labels" -}}
helm.sh/chart: {{ include "herald.chart" . }}
app.kubernetes.io/part-of: herald
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The operator's selector; app.kubernetes.io/name is also the `job` its monitors give its metrics. */}}
{{- define "herald.operator.selectorLabels" -}}
app.kubernetes.io/name: herald-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "herald.operator.labels" -}}
{{ include "herald.labels" . }}
{{ include "herald.operator.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "herald.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "herald.operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "herald.operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "herald.relay.image" -}}
{{- printf "%s:%s" .Values.relay.image.repository (default .Chart.AppVersion .Values.relay.image.tag) -}}
{{- end -}}

{{/* The labels the operator puts on every relay pod and Service (operator/src/objects.rs); the relay
monitors select on the first, which is also the `job` they give the relay's metrics. */}}
{{- define "herald.relay.selectorLabels" -}}
app.kubernetes.io/name: herald-relay
app.kubernetes.io/managed-by: herald-operator
{{- end -}}

{{/* The chart's Valkey (valkey.enabled): <fullname>-valkey, its password Secret and the key in it. */}}
{{- define "herald.valkey.fullname" -}}
{{- printf "%s-valkey" (include "herald.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{- define "herald.valkey.secretName" -}}
{{- default (include "herald.valkey.fullname" .) .Values.valkey.auth.existingSecret -}}
{{- end -}}

{{- define "herald.valkey.secretKey" -}}
{{- if .Values.valkey.auth.existingSecret -}}
{{- .Values.valkey.auth.secretKey -}}
{{- else -}}
password
{{- end -}}
{{- end -}}

{{- define "herald.valkey.selectorLabels" -}}
app.kubernetes.io/name: herald-valkey
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "herald.valkey.labels" -}}
{{ include "herald.labels" . }}
{{ include "herald.valkey.selectorLabels" . }}
app.kubernetes.io/component: store
{{- end -}}
