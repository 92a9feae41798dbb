//! `berth checkpoint`: CreateCheckpoint, ListCheckpoint and DeleteCheckpoint.

use berth_api::proto::api_client::ApiClient;
use berth_api::proto::{
    Checkpoint, CreateCheckpointRequest, DeleteCheckpointRequest, ListCheckpointRequest,
};
use clap::Subcommand;
use serde_json::Value;
use tonic::transport::Channel;

use crate::error::Error;
use crate::output::{checkpoint_json, format_table, print_json_pretty, write_stdout, yes_no};

#[derive(Subcommand)]
pub enum CheckpointCommand {
    /// Checkpoint a running container into <bundle>/checkpoints/NAME (needs a working CRIU)
    Create {
        /// Container id
        id: String,
        /// Checkpoint name
        name: String,
        /// Stop the container once it is checkpointed (default: it keeps running)
        #[arg(long)]
        exit: bool,
        /// Allow established TCP connections
        #[arg(long)]
        tcp: bool,
        /// Allow external unix sockets
        #[arg(long)]
        unix_sockets: bool,
        /// Allow shell jobs
        #[arg(long)]
        shell: bool,
    },
    /// List a container's checkpoints with the options they were taken with
    List {
        /// Container id
        id: String,
        /// Print a JSON array instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove a checkpoint of a container
    Rm {
        /// Container id
        id: String,
        /// Checkpoint name
        name: String,
    },
}

pub async fn execute(
    client: &mut ApiClient<Channel>,
    command: CheckpointCommand,
) -> Result<(), Error> {
    match command {
        CheckpointCommand::Create {
            id,
            name,
            exit,
            tcp,
            unix_sockets,
            shell,
        } => {
            let checkpoint = Checkpoint {
                name,
                exit,
                tcp,
                unix_sockets,
                shell,
            };
            client
                .create_checkpoint(CreateCheckpointRequest {
                    id,
                    checkpoint: Some(checkpoint),
                })
                .await?;
        }
        CheckpointCommand::List { id, json } => {
            let checkpoints = client
                .list_checkpoint(ListCheckpointRequest { id })
                .await?
                .into_inner()
                .checkpoints;
            if json {
                let array: Value = checkpoints.iter().map(checkpoint_json).collect();
                print_json_pretty(&array)?;
            } else {
                write_stdout(&checkpoints_table(&checkpoints))?;
            }
        }
        CheckpointCommand::Rm { id, name } => {
            client
                .delete_checkpoint(DeleteCheckpointRequest { id, name })
                .await?;
        }
    }
    Ok(())
}

fn checkpoints_table(checkpoints: &[Checkpoint]) -> String {
    let rows: Vec<Vec<String>> = checkpoints
        .iter()
        .map(|checkpoint| {
            vec![
                checkpoint.name.clone(),
                yes_no(checkpoint.exit),
                yes_no(checkpoint.tcp),
                yes_no(checkpoint.unix_sockets),
                yes_no(checkpoint.shell),
            ]
        })
        .collect();
    format_table(&["NAME", "EXIT", "TCP", "UNIX SOCKETS", "SHELL"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_table_shows_the_options_taken_with() {
        let checkpoints = vec![
            Checkpoint {
                name: "before-upgrade".to_owned(),
                exit: true,
                tcp: false,
                unix_sockets: true,
                shell: false,
            },
            Checkpoint {
                name: "cp2".to_owned(),
                ..Checkpoint::default()
            },
        ];
        assert_eq!(
            checkpoints_table(&checkpoints),
            "NAME             EXIT   TCP   UNIX SOCKETS   SHELL\n\
             before-upgrade   yes    no    yes            no\n\
             cp2              no     no    no             no\n"
        );
        assert_eq!(checkpoint_json(&checkpoints[0])["unixSockets"], true);
    }
}
